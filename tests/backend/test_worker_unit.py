"""The Worker in-process: failures inside a task become replies, the job table follows every request."""

from __future__ import annotations

import pytest
import torch

from backend import worker as worker_module
from backend.worker import Worker
from sdtex_contract import protocol


@pytest.fixture
def dispatcher():
    sent: list[dict] = []
    return Worker(sent.append), sent


def run_request(request_id, tiny_model_dir, tmp_path):
    params = {"model": str(tiny_model_dir), "prompt": "slate", "steps": 2, "width": 64, "height": 64, "seed": 9}
    return protocol.request(request_id, protocol.RUN, {"task": "txt2img", **params, "output_dir": str(tmp_path)})


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
    assert worker.handle(run_request("bad", tiny_model_dir, tmp_path)) is True
    reply = terminal(sent)
    assert reply["id"] == "bad" and reply["error"]["code"] == code
    if code == protocol.OUT_OF_MEMORY:
        for advice in ("width/height", "batch_size", "cpu_offload", "attention_slicing", "vae_tiling"):
            assert advice in reply["error"]["message"]
    else:
        assert "ZeroDivisionError" in reply["error"]["data"]["traceback"]
    assert worker.job_info("bad")["state"] == protocol.FAILED
    assert worker.job_info("bad")["error"]["code"] == code

    monkeypatch.undo()
    sent.clear()
    assert worker.handle(run_request("good", tiny_model_dir, tmp_path)) is True
    reply = terminal(sent)
    assert reply["id"] == "good" and len(reply["result"]["images"]) == 1
    # The artifacts in the result are the ones announced, in the same order.
    announced = [m["data"] for m in sent if m.get("event") == protocol.EVENT_ARTIFACT]
    assert reply["result"]["artifacts"] == announced and announced[0]["path"] == reply["result"]["images"][0]["path"]


def test_job_states_cancel_before_start_and_shutdown(dispatcher, tiny_model_dir, tmp_path):
    worker, sent = dispatcher
    first = worker.receive(run_request("j1", tiny_model_dir, tmp_path))
    second = worker.receive(run_request("j2", tiny_model_dir, tmp_path))
    assert [(j["id"], j["state"], j["queued_ahead"]) for j in worker.job_list()] == [
        ("j1", protocol.QUEUED, 0),
        ("j2", protocol.QUEUED, 1),
    ]
    # An id still in use is refused; a cancel request answers with the job's state.
    assert worker.receive(run_request("j2", tiny_model_dir, tmp_path)) is None
    assert sent.pop()["error"]["code"] == protocol.INVALID_REQUEST
    assert worker.receive(protocol.request("c", protocol.CANCEL, {"id": "j2"})) is None
    assert sent.pop()["result"]["cancel_requested"] is True
    worker.cancel("never-sent")  # unknown ids are ignored, not remembered
    worker.cancel(["unhashable"])

    assert worker.execute(first) is True
    assert terminal(sent)["id"] == "j1" and worker.job_info("j1")["state"] == protocol.DONE
    sent.clear()
    assert worker.execute(second) is True
    assert sent == [{"id": "j2", "cancelled": True}]  # never started: no events
    assert worker.job_info("j2")["state"] == protocol.CANCELLED
    sent.clear()
    assert worker.handle(protocol.request("x", protocol.JOB, {"id": "never-sent"})) is True
    assert sent.pop()["error"]["code"] == protocol.NOT_FOUND

    shutdown = worker.receive(protocol.request("s", protocol.SHUTDOWN))
    assert worker.receive(run_request("late", tiny_model_dir, tmp_path)) is None  # after shutdown: refused
    assert sent.pop()["error"]["code"] == protocol.SHUTTING_DOWN
    assert worker.execute(shutdown) is False
    assert sent == [{"id": "s", "result": {}}]
