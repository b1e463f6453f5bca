"""The Worker dispatcher in-process: failures inside a task become replies and the worker keeps serving."""

from __future__ import annotations

import pytest
import torch

from backend import worker as worker_module
from backend.worker import Worker
from blender_sd_addon import protocol


@pytest.fixture
def dispatcher():
    sent: list[dict] = []
    return Worker(sent.append), sent


def generate_request(request_id, tiny_model_dir, tmp_path):
    params = {"model": str(tiny_model_dir), "prompt": "slate", "steps": 2, "width": 64, "height": 64, "seed": 9}
    return protocol.request(request_id, protocol.GENERATE, {**params, "output_dir": str(tmp_path)})


def terminal(sent: list[dict]) -> dict:
    replies = [m for m in sent if protocol.is_terminal(m)]
    assert len(replies) == 1, replies  # exactly one terminal reply per request
    return replies[0]


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), protocol.OUT_OF_MEMORY),
        (MemoryError(), protocol.OUT_OF_MEMORY),
        (ZeroDivisionError("boom"), protocol.INTERNAL_ERROR),
    ],
)
def test_task_failure_becomes_an_error_and_the_worker_survives(
    dispatcher, tiny_model_dir, tmp_path, monkeypatch, failure, code
):
    worker, sent = dispatcher

    def failing_task(*args, **kwargs):
        raise failure

    monkeypatch.setitem(worker_module.TASKS, "txt2img", failing_task)
    assert worker.handle(generate_request("bad", tiny_model_dir, tmp_path)) is True
    reply = terminal(sent)
    assert reply["id"] == "bad" and reply["error"]["code"] == code
    if code == protocol.OUT_OF_MEMORY:
        for advice in ("width/height", "batch_size", "cpu_offload", "attention_slicing", "vae_tiling"):
            assert advice in reply["error"]["message"]
    else:
        assert "ZeroDivisionError" in reply["error"]["data"]["traceback"]

    monkeypatch.undo()
    sent.clear()
    assert worker.handle(generate_request("good", tiny_model_dir, tmp_path)) is True
    reply = terminal(sent)
    assert reply["id"] == "good" and len(reply["result"]["images"]) == 1


def test_cancel_before_start_and_shutdown(dispatcher, tiny_model_dir, tmp_path):
    worker, sent = dispatcher
    worker.accept("c1")  # queued, as the reader thread records it
    worker.cancel("c1")
    worker.cancel("never-sent")  # unknown ids are ignored, not remembered
    assert worker.handle(generate_request("c1", tiny_model_dir, tmp_path)) is True
    assert sent == [{"id": "c1", "cancelled": True}]
    assert not worker.is_cancelled("never-sent")
    sent.clear()
    assert worker.handle(protocol.request("s", protocol.SHUTDOWN)) is False
    assert sent == [{"id": "s", "result": {}}]
