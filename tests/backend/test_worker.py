"""The real worker process (`python -m backend serve`) over JSON lines, with the tiny model."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from worker_process import WorkerProcess

from sdtex_contract import protocol


@pytest.fixture
def params(run_params):
    return {**run_params, "negative_prompt": "blurry", "scheduler": "euler_a"}


def generate(worker: WorkerProcess, params: dict, **changes) -> tuple[dict, list[dict]]:
    reply, events = worker.call(protocol.RUN, {**params, **changes})
    assert "result" in reply, reply
    return reply["result"], events


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_handshake(worker):
    reply, _ = worker.call(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION})
    result = protocol.HandshakeResult(**reply["result"])
    assert result.protocol_version == protocol.PROTOCOL_VERSION
    assert result.schedulers == list(protocol.SCHEDULERS)
    assert set(result.capabilities) >= {"jobs", "upload", "artifacts", "fetch"}
    # Each task lists its parameter specs, so clients can build controls and flags from them.
    assert set(result.tasks) == set(protocol.TASKS) and {"txt2img", "pbr"} <= set(result.tasks)
    txt2img = {spec["name"]: spec for spec in result.tasks["txt2img"]["params"]}
    assert txt2img["width"]["range"] == {"low": 64, "high": 2048, "multiple": 8}
    assert txt2img["scheduler"]["choices"] == list(protocol.SCHEDULERS) and txt2img["prompt"]["required"]
    assert {spec["name"]: spec["type"] for spec in result.tasks["pbr"]["params"]}["image"] == "image"
    assert "cpu" in result.devices
    assert result.torch_version and result.diffusers_version and result.backend_version


def test_protocol_mismatch(worker):
    reply, _ = worker.call(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION + 1})
    assert reply["error"]["code"] == protocol.PROTOCOL_MISMATCH
    assert reply["error"]["data"] == {"expected": protocol.PROTOCOL_VERSION, "got": str(protocol.PROTOCOL_VERSION + 1)}


def test_generate_writes_pngs_with_events(worker, params):
    result, events = generate(worker, params, seed=11, batch_size=2, preview_every=1)
    parsed = protocol.GenerateResult.from_dict(result)
    assert [record.seed for record in parsed.images] == [11, 12]
    for record in parsed.images:
        with Image.open(record.path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    assert parsed.params["prompt"] == params["prompt"]
    assert {"load", "encode", "denoise", "decode", "save", "total"} <= set(parsed.timings)

    stages = [e["data"]["stage"] for e in events if e["event"] == protocol.EVENT_STATUS]
    assert stages == ["loading_model", "encoding", "denoising", "decoding", "saving"]
    progress = [protocol.ProgressEvent(**e["data"]) for e in events if e["event"] == protocol.EVENT_PROGRESS]
    assert [(p.step, p.total) for p in progress] == [(1, 2), (2, 2)]
    previews = [protocol.PreviewEvent(**e["data"]) for e in events if e["event"] == protocol.EVENT_PREVIEW]
    assert [p.step for p in previews] == [1, 2]
    # The tiny VAE halves the size: latents are 32x32.
    assert all(len(base64.b64decode(p.rgb)) == p.width * p.height * 3 == 32 * 32 * 3 for p in previews)


def test_same_seed_same_pixels_other_seed_differs(worker, params):
    first, _ = generate(worker, params, seed=1234)
    again, _ = generate(worker, params, seed=1234)
    other, _ = generate(worker, params, seed=1235)
    a, b, c = (pixels(r["images"][0]["path"]) for r in (first, again, other))
    assert first["images"][0]["path"] != again["images"][0]["path"]  # nothing is overwritten
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unset_seed_is_reported_and_reproducible(worker, params):
    random_run, _ = generate(worker, params)
    seed = random_run["seed"]
    assert isinstance(seed, int) and 0 <= seed <= protocol.SEED_MAX
    assert random_run["params"]["seed"] is None
    replay, _ = generate(worker, params, seed=seed)
    assert np.array_equal(pixels(random_run["images"][0]["path"]), pixels(replay["images"][0]["path"]))


def test_cancel_mid_run_then_next_request_works(worker, params):
    request_id = worker.request(protocol.RUN, {**params, "steps": 50})
    while True:  # wait until denoising has begun
        message = worker.recv()
        if message.get("event") == protocol.EVENT_PROGRESS:
            break
        assert not protocol.is_terminal(message), message
    worker.send(protocol.notification(protocol.CANCEL, {"id": request_id}))
    reply, events = worker.wait(request_id)
    assert reply == {"id": request_id, "cancelled": True}
    steps_after_cancel = [e for e in events if e["event"] == protocol.EVENT_PROGRESS]
    # The step running when the cancel arrived may finish (and one more if the reader thread was not scheduled
    # before the step ended); never more.
    assert len(steps_after_cancel) <= 2, steps_after_cancel
    assert not any(e["data"].get("stage") == "decoding" for e in events if e["event"] == protocol.EVENT_STATUS)
    result, _ = generate(worker, params, seed=5)
    assert len(result["images"]) == 1


def test_cancel_of_a_queued_request(worker, params):
    running = worker.request(protocol.RUN, {**params, "steps": 6})
    queued = worker.request(protocol.RUN, {**params, "steps": 6})
    worker.send(protocol.notification(protocol.CANCEL, {"id": queued}))
    reply, _ = worker.wait(running)
    assert "result" in reply
    reply, events = worker.wait(queued)
    assert reply == {"id": queued, "cancelled": True} and events == []


@pytest.mark.parametrize(
    ("line", "code", "reply_id"),
    [
        (b"{this is not json\n", protocol.PARSE_ERROR, None),
        (b'["run"]\n', protocol.PARSE_ERROR, None),
        (b'{"id": "m1", "method": "paint", "params": {}}\n', protocol.METHOD_NOT_FOUND, "m1"),
        (b'{"id": "m2", "method": "run", "params": [1]}\n', protocol.INVALID_REQUEST, "m2"),
        (b'{"method": "run", "params": {}}\n', protocol.INVALID_REQUEST, None),
        (b'{"id": {"x": 1}, "method": "run", "params": {}}\n', protocol.INVALID_REQUEST, None),
        (b'{"id": "m3", "params": {}}\n', protocol.INVALID_REQUEST, "m3"),
    ],
)
def test_malformed_lines_get_errors_and_worker_stays(worker, line, code, reply_id):
    worker.send_raw(line)
    reply = worker.recv()
    assert reply["id"] == reply_id and reply["error"]["code"] == code, reply
    ok, _ = worker.call(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION, "extra": "ignored"})
    assert ok["result"]["protocol_version"] == protocol.PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"steps": 0}, "steps"),
        ({"width": 100}, "width"),
        ({"scheduler": "k_lms"}, "scheduler"),
        ({"prompt": ""}, "prompt"),
        ({"output_dir": "relative/dir"}, "output_dir"),
        ({"device": "cuda"}, "device"),  # valid choice, but no GPU here (skipped where there is one)
        ({"cpu_offload": True}, "cpu_offload"),  # needs CUDA
    ],
)
def test_invalid_params_through_the_worker(worker, params, change, name):
    if name in ("device", "cpu_offload") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    reply, _ = worker.call(protocol.RUN, {**params, **change})
    assert reply["error"]["code"] == protocol.INVALID_PARAMS
    assert reply["error"]["data"]["param"] == name and name in reply["error"]["message"]
    result, _ = generate(worker, params, seed=1)
    assert result["images"]


def test_filename_prefix_cannot_escape(worker, params, tmp_path):
    out = tmp_path / "out"
    for prefix in ("../../escape", "/etc/passwd", "..", "a/../../b", "CON:x?*"):
        result, _ = generate(worker, params, seed=2, filename_prefix=prefix)
        path = result["images"][0]["path"]
        assert Path(path).parent == out.resolve(), (prefix, path)
    assert not list(tmp_path.glob("escape*")) and not list(tmp_path.parent.glob("escape*"))
    # NUL in any path-like text is refused by name before any work (it used to surface as internal_error).
    for name in ("filename_prefix", "output_dir", "model"):
        reply, _ = worker.call(protocol.RUN, {**params, name: "/tmp/a\x00b"})
        assert reply["error"]["code"] == protocol.INVALID_PARAMS and reply["error"]["data"]["param"] == name


def test_load_model(worker, tiny_model_dir, tmp_path):
    reply, _ = worker.call(protocol.LOAD_MODEL, {"model": str(tiny_model_dir), "dtype": "fp32"})
    assert reply["result"]["model"] == str(tiny_model_dir)
    assert reply["result"]["device"] == "cpu" and reply["result"]["dtype"] == "fp32"
    assert reply["result"]["load_seconds"] >= 0
    copy = tmp_path / "copy"  # another path is another model: a real load, then a one-step warm-up
    shutil.copytree(tiny_model_dir, copy)
    fresh, _ = worker.call(protocol.LOAD_MODEL, {"model": str(copy)})
    assert fresh["result"]["load_seconds"] > 0 and fresh["result"]["warmup_seconds"] > 0
    again, _ = worker.call(protocol.LOAD_MODEL, {"model": str(tiny_model_dir), "dtype": "fp32"})
    assert again["result"]["load_seconds"] > 0  # switched back
    again, _ = worker.call(protocol.LOAD_MODEL, {"model": str(tiny_model_dir), "dtype": "fp32"})
    assert again["result"]["load_seconds"] == 0 and again["result"]["warmup_seconds"] == 0  # warm: nothing to do
    handshake, _ = worker.call(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION})
    assert handshake["result"]["loaded_model"] == str(tiny_model_dir)
    reply, _ = worker.call(protocol.LOAD_MODEL, {"model": ""})
    assert reply["error"]["code"] == protocol.INVALID_PARAMS and reply["error"]["data"]["param"] == "model"


def test_unsafe_and_missing_models(worker, params, tmp_path, tiny_model_dir):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle would run here")
    bin_folder = tmp_path / "bin-model"
    (bin_folder / "unet").mkdir(parents=True)
    (bin_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (bin_folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    cases = [
        (str(ckpt), protocol.UNSAFE_CHECKPOINT),
        (str(bin_folder), protocol.UNSAFE_CHECKPOINT),
        (str(tmp_path / "nowhere"), protocol.MODEL_NOT_FOUND),
        ("no-such-owner/no-such-model", protocol.MODEL_NOT_FOUND),  # HF_HUB_OFFLINE=1 and not cached
    ]
    for model, code in cases:
        reply, _ = worker.call(protocol.RUN, {**params, "model": model})
        assert reply["error"]["code"] == code, (model, reply)
        assert reply["error"]["data"]["param"] == "model"
    reply, _ = worker.call(protocol.RUN, {**params, "model": "no-such-owner/no-such-model"})
    assert "hf download" in reply["error"]["message"]
    result, _ = generate(worker, params, seed=3)
    assert result["images"]


def test_shutdown_and_eof_exit_zero():
    process = WorkerProcess()
    reply, _ = process.call(protocol.SHUTDOWN)
    assert reply == {"id": "t1", "result": {}}
    assert process.proc.wait(60) == 0
    process.close()

    process = WorkerProcess()
    assert process.close() == 0  # stdin closed at once
