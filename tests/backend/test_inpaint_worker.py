"""inpaint and make_seamless through the real worker process: the handshake lists them, the image goes by
path and the mask by uploaded bytes (as an unsaved Blender image would), artifacts come before the
result, the kept pixels are the source's byte for byte, and a bad mask is refused by name."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from scipy import ndimage
from worker_process import WorkerProcess

from sdtex_contract import protocol

SIZE = 64


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 3, y * 3, np.full_like(x, 90)], -1).astype(np.uint8)  # a gradient: does not tile
    path = tmp_path_factory.mktemp("inpaint-worker") / "plaster.png"
    PIL.Image.fromarray(rgb).save(path)
    return path


def pixels(path: str | Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(worker, data: bytes) -> dict:
    reply, _ = worker.call(protocol.UPLOAD, {"data": base64.b64encode(data).decode()})
    return {"sha256": reply["result"]["sha256"]}


def common(tiny_model_dir: Path, source: Path, tmp_path: Path) -> dict:
    return {
        "model": str(tiny_model_dir),
        "prompt": "cracked plaster",
        "steps": 2,
        "seed": 8,
        "image": {"path": str(source)},
        "output_dir": str(tmp_path / "out"),
    }


def test_the_handshake_lists_the_tasks(worker):
    reply, _ = worker.call(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION})
    tasks = reply["result"]["tasks"]
    specs = {p["name"]: p for p in tasks["inpaint"]["params"]}
    assert specs["mask_from"]["choices"] == list(protocol.MASK_SOURCES) and specs["mask"]["type"] == "image"
    assert specs["strength"]["range"] == {"low": 0.0, "high": 1.0, "multiple": 0}
    assert specs["seamless"]["choices"][-1] == "auto" and specs["resize"]["default"] == "keep"
    assert {p["name"] for p in tasks["make_seamless"]["params"]} >= {"band_width", "mask_blur", "strength"}


def test_inpaint_job_with_an_uploaded_mask(worker, tiny_model_dir, source, tmp_path):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 30:60] = 255
    params = {**common(tiny_model_dir, source, tmp_path), "task": "inpaint", "mask_blur": 2}
    request_id = worker.request(protocol.RUN, {**params, "mask": upload(worker, png_bytes(mask))})
    messages = worker.collect([request_id])[request_id]
    assert "result" in messages[-1], messages[-1]
    result = messages[-1]["result"]
    announced = [m["data"] for m in messages if m.get("event") == protocol.EVENT_ARTIFACT]
    assert len(announced) == 1 and announced == result["artifacts"]
    stages = [m["data"]["stage"] for m in messages if m.get("event") == protocol.EVENT_STATUS]
    assert stages == ["loading_model", "encoding", "denoising", "decoding", "saving"]
    assert result["task"] == "inpaint" and (result["width"], result["height"]) == (SIZE, SIZE)

    out = pixels(result["images"][0]["path"])
    kept = ~ndimage.binary_dilation(mask > 0, np.ones((5, 5), bool))  # 2 px of feather
    assert np.array_equal(out[kept], pixels(source)[kept])
    assert (out[mask > 0] != pixels(source)[mask > 0]).any()

    # A mask of another size is refused by name, before any file is written.
    reply, events = worker.call(protocol.RUN, {**params, "mask": upload(worker, png_bytes(mask[:32]))})
    assert reply["error"]["code"] == protocol.INVALID_PARAMS and reply["error"]["data"]["param"] == "mask"
    assert not [e for e in events if e["event"] == protocol.EVENT_ARTIFACT]


def test_make_seamless_job(worker, tiny_model_dir, source, tmp_path):
    params = {**common(tiny_model_dir, source, tmp_path), "task": "make_seamless", "band_width": 16, "mask_blur": 0}
    reply, events = worker.call(protocol.RUN, params)
    result = reply["result"]
    assert result["task"] == "make_seamless" and result["seamless"] == "xy"
    out, before = pixels(result["images"][0]["path"]), pixels(source)
    band = np.zeros((SIZE, SIZE), bool)
    band[:, :8] = band[:, -8:] = band[:8, :] = band[-8:, :] = True
    assert np.array_equal(out[~band], before[~band])
    assert (out[band] != before[band]).any(axis=-1).mean() > 0.5
    assert [e["data"] for e in events if e["event"] == protocol.EVENT_ARTIFACT] == result["artifacts"]


def test_an_inpainting_model_refuses_txt2img_and_img2img_naming_the_model(tmp_path):
    """A 9-channel U-Net can only inpaint: other tasks say so instead of failing inside the U-Net, and
    load_model loads it without a txt2img warm-up."""
    from backend.tiny_model import make_test_model

    model = str(make_test_model(tmp_path / "tiny-inpaint", architecture="tiny-inpaint"))
    source = tmp_path / "source.png"
    PIL.Image.new("RGB", (64, 64), (90, 120, 60)).save(source)
    worker = WorkerProcess()
    try:
        loaded, _ = worker.call(protocol.LOAD_MODEL, {"model": model})
        assert loaded["result"]["load_seconds"] > 0 and loaded["result"]["warmup_seconds"] == 0
        common = {"model": model, "prompt": "moss", "steps": 2, "width": 64, "height": 64, "output_dir": str(tmp_path)}
        for task, extra in (("txt2img", {}), ("img2img", {"image": {"path": str(source)}})):
            reply, _ = worker.call(protocol.RUN, {"task": task, **common, **extra})
            assert reply["error"]["code"] == protocol.INVALID_PARAMS and reply["error"]["data"]["param"] == "model"
            assert "inpaint task" in reply["error"]["message"]
    finally:
        worker.close()
