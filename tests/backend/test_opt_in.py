"""Opt-in checks for what this machine cannot do: real weights (SDTEX_REAL_MODEL) and a GPU (SDTEX_GPU=1).

    SDTEX_REAL_MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5 .venv/bin/python -m pytest tests/backend/test_opt_in.py
    SDTEX_GPU=1 .venv/bin/python -m pytest tests/backend/test_opt_in.py

The default suite proves the same code paths on the tiny model; these add real weights and CUDA/fp16.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from worker_process import WorkerProcess

from sdtex_contract import protocol

REAL_MODEL = os.environ.get("SDTEX_REAL_MODEL", "")
GPU = os.environ.get("SDTEX_GPU") == "1"


def generate(model: str, out, **changes) -> tuple[dict, list[dict]]:
    worker = WorkerProcess(env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")})
    try:
        params = dict(model=model, prompt="weathered oak planks, texture", output_dir=str(out), seed=7, steps=20)
        reply, events = worker.wait(worker.request(protocol.RUN, {"task": "txt2img"} | params | changes), timeout=1800)
    finally:
        worker.close()
    assert "result" in reply, reply
    return reply["result"], events


@pytest.mark.skipif(not REAL_MODEL, reason="set SDTEX_REAL_MODEL to a hub id, folder or .safetensors file")
def test_real_weights_make_a_seamless_texture_with_maps(tmp_path):
    result, events = generate(REAL_MODEL, tmp_path, seamless="xy", pbr=True)
    image = np.asarray(Image.open(result["images"][0]["path"]).convert("RGB"), dtype=np.float32)
    assert image.shape == (512, 512, 3) and image.std() > 10  # a picture, not a flat or black frame
    # Real weights: opposite edges of a seamless texture meet (a wrap seam no larger than inner seams).
    wrap_seam = np.abs(image[:, 0] - image[:, -1]).mean()
    inner_seam = np.abs(image[:, 255] - image[:, 256]).mean()
    assert wrap_seam < 3 * inner_seam + 5
    assert set(result["images"][0]["maps"]) == {"height", "normal", "roughness", "ao"}
    assert sum(e["event"] == "progress" for e in events) == 20


@pytest.mark.skipif(not GPU, reason="set SDTEX_GPU=1 on a machine with CUDA")
def test_gpu_fp16_matches_the_cpu_picture(tiny_model_dir, tmp_path):
    common = dict(width=64, height=64, steps=4, scheduler="ddim")
    gpu, _ = generate(str(tiny_model_dir), tmp_path / "gpu", device="cuda", dtype="fp16", **common)
    cpu, _ = generate(str(tiny_model_dir), tmp_path / "cpu", device="cpu", dtype="fp32", **common)
    assert gpu["params"]["device"] == "cuda"
    a, b = (np.asarray(Image.open(r["images"][0]["path"]), dtype=np.float32) for r in (gpu, cpu))
    assert np.abs(a - b).mean() < 4  # same seed, same picture up to fp16 rounding
