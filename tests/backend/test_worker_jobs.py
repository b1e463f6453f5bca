"""Protocol 2 through the real worker process: inputs by path and by bytes, artifacts, many jobs, job list."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from worker_process import WorkerProcess

from sdtex_contract import protocol


@pytest.fixture
def params(run_params):
    return {**run_params, "seed": 21}


def albedo(tmp_path: Path) -> Path:
    """A tiling test picture (a sum of whole sine periods) saved as PNG."""
    y, x = np.mgrid[0:48, 0:64]
    value = 128 + 60 * np.sin(2 * np.pi * x / 64 * 3) + 60 * np.cos(2 * np.pi * y / 48 * 2)
    path = tmp_path / "bricks.png"
    Image.fromarray(np.stack([value, value * 0.8, value * 0.6], -1).astype(np.uint8)).save(path)
    return path


def result_of(messages: list[dict]) -> dict:
    assert "result" in messages[-1], messages[-1]
    return messages[-1]["result"]


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_pbr_of_an_image_by_path_and_by_bytes_is_the_same(worker, tmp_path):
    source = albedo(tmp_path)
    common = {"task": "pbr", "seamless": "xy", "output_dir": str(tmp_path / "maps")}
    reply, _ = worker.call(protocol.RUN, {**common, "image": {"path": str(source)}})
    by_path = reply["result"]
    # Bytes uploaded once, named by their sha256 (what an unsaved Blender image sends).
    data = source.read_bytes()
    upload, _ = worker.call(protocol.UPLOAD, {"data": base64.b64encode(data).decode()})
    digest = upload["result"]["sha256"]
    assert digest == hashlib.sha256(data).hexdigest() and upload["result"]["size"] == len(data)
    reply, _ = worker.call(protocol.RUN, {**common, "image": {"sha256": digest}})
    by_bytes = reply["result"]

    for result in (by_path, by_bytes):
        assert result["task"] == "pbr" and (result["width"], result["height"]) == (64, 48)
        assert set(result["images"][0]["maps"]) == {"height", "normal", "roughness", "ao"}
    for name, path in by_path["images"][0]["maps"].items():
        assert np.array_equal(pixels(path), pixels(by_bytes["images"][0]["maps"][name])), name
    assert by_path["images"][0]["path"] == str(source)  # the source keeps its place; nothing is copied
    assert Path(by_path["images"][0]["maps"]["normal"]).name == "bricks_normal.png"


def test_bad_inputs_are_named_before_any_work(worker, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    common = {"task": "pbr", "output_dir": str(tmp_path / "maps")}
    cases = [
        ({"path": str(text)}, "image", "an image file"),
        ({"path": str(tmp_path / "missing.png")}, "image", "no such file"),
        ({"sha256": "0" * 64}, "image", "upload method"),
        ({"path": "relative.png"}, "image", "absolute"),
    ]
    for ref, param, words in cases:
        reply, events = worker.call(protocol.RUN, {**common, "image": ref})
        assert reply["error"]["code"] == protocol.INVALID_PARAMS, reply
        assert reply["error"]["data"]["param"] == param and words in reply["error"]["message"]
        assert not [e for e in events if e["event"] == protocol.EVENT_ARTIFACT]
    for bad in ({"data": "***"}, {"data": 5}, {"data": "aGk=", "sha256": "0" * 64}):
        reply, _ = worker.call(protocol.UPLOAD, bad)
        assert reply["error"]["code"] == protocol.INVALID_PARAMS


def test_artifacts_come_before_the_reply_and_can_be_fetched(worker, params):
    request_id = worker.request(protocol.RUN, {**params, "batch_size": 2, "pbr": True})
    messages = worker.collect([request_id])[request_id]
    result = result_of(messages)
    announced = [m["data"] for m in messages if m.get("event") == protocol.EVENT_ARTIFACT]
    assert len(announced) == 10 and announced == result["artifacts"]  # 2 albedos + 4 maps each, before the reply
    first = next(i for i, m in enumerate(messages) if m.get("event") == protocol.EVENT_ARTIFACT)
    assert first < len(messages) - 1 and protocol.is_terminal(messages[-1])

    # fetch: an artifact's bytes in chunks, exactly; anything not announced is refused.
    artifact = announced[0]
    chunks, offset = [], 0
    while True:
        reply, _ = worker.call(protocol.FETCH, {"path": artifact["path"], "offset": offset, "length": 4000})
        chunk = base64.b64decode(reply["result"]["data"])
        chunks.append(chunk)
        offset += len(chunk)
        if reply["result"]["eof"]:
            break
    data = b"".join(chunks)
    assert len(chunks) > 1 and data == Path(artifact["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == artifact["sha256"] and len(data) == artifact["size"]
    for path in ("/etc/passwd", str(Path(artifact["path"]).parent), 5):
        reply, _ = worker.call(protocol.FETCH, {"path": path})
        assert reply["error"]["code"] == protocol.NOT_FOUND


def test_two_queued_jobs_one_cancelled_while_the_other_runs(worker, params):
    slow = worker.request(protocol.RUN, {**params, "steps": 40, "seed": 1})
    second = worker.request(protocol.RUN, {**params, "seed": 2})
    third = worker.request(protocol.RUN, {**params, "seed": 3})
    # The job list answers at once, even while a job runs.
    while True:
        message = worker.recv()
        assert message["id"] == slow, message
        if message.get("event") == protocol.EVENT_PROGRESS:
            break
    listing, _ = worker.call(protocol.JOBS)
    states = {j["id"]: (j["state"], j["queued_ahead"]) for j in listing["result"]["jobs"]}
    assert states[slow][0] == protocol.RUNNING
    assert states[second] == (protocol.QUEUED, 1) and states[third] == (protocol.QUEUED, 2)

    # Cancel the running job (as a request: it answers with the job), and let the queued ones run.
    cancel, _ = worker.call(protocol.CANCEL, {"id": slow})
    assert cancel["result"]["id"] == slow and cancel["result"]["cancel_requested"]
    seen = worker.collect([slow, second, third])
    assert seen[slow][-1] == {"id": slow, "cancelled": True}
    for job in (second, third):
        states = [m["data"]["state"] for m in seen[job] if m.get("event") == protocol.EVENT_STATE]
        assert states == [protocol.RUNNING] and result_of(seen[job])["seed"] in (2, 3)
    for job, state in ((slow, protocol.CANCELLED), (second, protocol.DONE), (third, protocol.DONE)):
        info, _ = worker.call(protocol.JOB, {"id": job})
        assert info["result"]["state"] == state
    info, _ = worker.call(protocol.JOB, {"id": second})
    assert len(info["result"]["artifacts"]) == 1 and info["result"]["step"] == info["result"]["total"] == 2


def test_a_library_printing_to_stdout_cannot_corrupt_the_stream(tmp_path, params):
    """Stray text before the worker takes stdout over, and prints (Python and raw fd 1) during a job."""
    code = (
        "import os, sys\n"
        "sys.stdout.write('banner from a sitecustomize, no newline'); sys.stdout.flush()\n"
        "from backend import tasks\n"
        "from backend.worker import serve\n"
        "pbr = tasks.TASKS['pbr']\n"
        "def noisy(ctx, params):\n"
        "    print('a library prints'); os.write(1, b'raw bytes on fd 1\\n')\n"
        "    return pbr(ctx, params)\n"
        "tasks.TASKS['pbr'] = noisy\n"
        "serve()\n"
    )
    import sys

    process = WorkerProcess(command=[sys.executable, "-c", code], banner=True)
    try:
        reply, _ = process.call(
            protocol.RUN, {"task": "pbr", "image": {"path": str(albedo(tmp_path))}, "output_dir": str(tmp_path)}
        )
        assert process.banner == b"banner from a sitecustomize, no newline\n"
        assert "result" in reply  # every line after the banner parsed as JSON (WorkerProcess fails otherwise)
        assert "a library prints" in process.stderr_text() and "raw bytes on fd 1" in process.stderr_text()
    finally:
        process.close()
