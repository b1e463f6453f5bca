"""Jobs and the JobBoard: state from the worker's messages, many jobs on their own clients, cheap polls."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from blender_sd_addon.client import BACKEND_STOPPED, BackendClient
from blender_sd_addon.contract import protocol
from blender_sd_addon.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job, JobBoard

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_client(mode: str, tmp_path: Path) -> BackendClient:
    return BackendClient([sys.executable, str(FAKE_WORKER), mode], log_path=tmp_path / f"{mode}.log")


class StubClient:
    """Just what a Job reads of its client."""

    starting = False

    def __init__(self):
        self.inbox: list[dict] = []
        self.cancelled: list[str] = []

    def submit(self, method: str, params: dict) -> str:
        return "r1"

    def messages(self, request_id: str) -> list[dict]:
        batch, self.inbox = self.inbox, []
        return batch

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


def stub_job() -> Job:
    return Job(StubClient(), "r1", "txt2img")


def poll_until(board: JobBoard, done, timeout: float = 20.0) -> list[Job]:
    finished: list[Job] = []
    deadline = time.monotonic() + timeout
    while not done(finished):
        assert time.monotonic() < deadline, "the jobs did not finish"
        finished += board.poll()
        time.sleep(0.01)
    return finished


def test_job_reports_state_steps_time_left_and_errors():
    job = stub_job()
    assert job.state == QUEUED and job.status_text == "Queued"
    job.client.starting = True
    assert job.status_text == "Starting backend…"
    job.handle({"id": "r1", "event": "state", "data": {"state": "running"}})
    job.handle({"id": "r1", "event": "status", "data": {"stage": "loading_model"}})
    assert job.state == RUNNING and job.status_text == "Loading model…"
    job.handle({"id": "r1", "event": "progress", "data": {"step": 2, "total": 10, "elapsed": 3.0}})
    assert job.status_text == "Step 2/10 · ~12s left"  # 1.5 s per step, 8 steps to go
    assert job.fraction == pytest.approx(0.2)
    job.handle({"id": "r1", "error": {"code": "model_not_found", "message": "model not found: /x\nhow to get it"}})
    assert job.state == FAILED and job.finished and job.finished_at is not None
    assert job.error_code == "model_not_found" and job.status_text == "Failed: model not found: /x"


def test_job_keeps_the_latest_preview_and_every_artifact_in_order():
    job = stub_job()
    for step in (1, 2):
        job.handle({"id": "r1", "event": "preview", "data": {"step": step, "width": 1, "height": 1, "rgb": "AAAA"}})
    assert job.preview.step == 2 and job.preview_serial == 2
    for role in ("albedo", "normal"):
        artifact = {"path": f"/t/{role}.png", "kind": "map", "size": 1, "sha256": "0" * 64, "role": role, "new": 1}
        job.handle({"id": "r1", "event": "artifact", "data": artifact})
    job.handle({"id": "r1", "event": "artifact", "data": {"path": "/t/incomplete.png"}})  # ignored, not a crash
    assert [a.role for a in job.artifacts] == ["albedo", "normal"]
    assert job.artifacts[1] == protocol.Artifact("/t/normal.png", "map", 1, "0" * 64, role="normal")


def test_cancel_says_cancelling_at_once_and_a_training_job_keeps_its_losses():
    client = StubClient()
    job = Job.submit(client, "train_lora", {})
    for step, loss in ((1, 0.5), (2, 0.25)):
        job.handle({"id": "r1", "event": "progress", "data": {"step": step, "total": 4, "loss": loss}})
    assert job.losses == [0.5, 0.25] and job.status_text.startswith("Step 2/4")
    job.cancel()
    assert client.cancelled == ["r1"] and job.status_text == "Cancelling…" and not job.finished
    job.handle({"id": "r1", "cancelled": True})
    assert job.state == CANCELLED and job.status_text == "Cancelled"


def test_a_malformed_result_fails_the_job_instead_of_raising():
    job = stub_job()
    job.handle({"id": "r1", "result": {"images": "nonsense"}})
    assert job.state == FAILED and "malformed result" in job.error


def test_a_task_without_images_keeps_its_own_result():
    job = stub_job()
    job.handle({"id": "r1", "result": {"model": "owner/name", "files": 12}})  # e.g. a finished download
    assert job.state == DONE and job.result is None and job.data == {"model": "owner/name", "files": 12}


def test_job_on_a_fake_worker_from_submit_to_result(tmp_path):
    client = fake_client("echo", tmp_path)
    try:
        job = Job.submit(client, "txt2img", {"prompt": "brick", "output_dir": "/t"})
        deadline = time.monotonic() + 20
        while not job.finished and time.monotonic() < deadline:
            job.poll()
            time.sleep(0.01)
        assert job.state == DONE and job.status_text == "Done"
        assert job.result.images[0].path == "/t/a.png" and job.result.params["task"] == "txt2img"
        assert [a.path for a in job.artifacts] == ["/t/a.png", "/t/a_normal.png"]
        assert (job.step, job.total) == (3, 3)
        assert not job.poll()  # finished: nothing more is read
    finally:
        client.shutdown()


def test_board_follows_jobs_on_their_own_clients_and_reports_each_finish_once(tmp_path):
    fast, slow = fake_client("echo", tmp_path), fake_client("slow", tmp_path)
    board = JobBoard()
    try:
        done_jobs = [board.submit(fast, "txt2img", {"output_dir": f"/t{n}"}) for n in range(3)]
        running = board.submit(slow, "txt2img", {})
        finished = poll_until(board, lambda finished: len(finished) == 3)
        assert finished == done_jobs and all(job.state == DONE for job in finished)
        assert running.client is slow and board.active == [running]

        poll_until(board, lambda _: running.step >= 2)
        board.cancel(running)
        assert poll_until(board, lambda finished: finished) == [running]
        assert running.state == CANCELLED and board.poll() == []
        assert board.jobs == [*done_jobs, running]
    finally:
        fast.shutdown()
        slow.shutdown()


def test_board_job_fails_when_its_client_is_shut_down(tmp_path):
    client = fake_client("slow", tmp_path)
    board = JobBoard()
    job = board.submit(client, "txt2img", {})
    poll_until(board, lambda _: job.state == RUNNING)
    client.shutdown(timeout=0.5)  # the scripted worker is too busy to answer: terminated
    assert poll_until(board, lambda finished: finished) == [job]
    assert job.state == FAILED and job.error_code == BACKEND_STOPPED


def test_board_drops_old_finished_jobs_and_caps_them():
    board = JobBoard(keep=2, keep_seconds=60)
    jobs = [board.submit(StubClient(), "txt2img", {}) for _ in range(4)]
    jobs[0].client.inbox.append({"id": jobs[0].request_id, "cancelled": True})
    assert board.poll() == [jobs[0]] and board.jobs == jobs  # kept for a while
    for job in jobs[1:3]:
        job.client.inbox.append({"id": job.request_id, "cancelled": True})
    assert board.poll() == jobs[1:3]
    assert board.jobs == jobs[1:]  # at most two finished ones: the oldest went

    jobs[1].finished_at -= 61
    board._next_prune = 0.0  # pruning by age is checked once a second
    board.poll()
    assert board.jobs == jobs[2:]


def test_polling_is_cheap_when_nothing_happened(tmp_path):
    client = fake_client("slow_handshake", tmp_path)  # still starting: no message for a while
    board = JobBoard()
    try:
        for _ in range(20):
            board.submit(client, "txt2img", {})
        began = time.perf_counter()
        for _ in range(1000):
            assert board.poll() == []
        assert time.perf_counter() - began < 0.5  # 20 000 mailbox checks; the UI polls every 10 ms
        assert all(job.status_text == "Starting backend…" for job in board.jobs)
    finally:
        client.shutdown()


def test_abandon_cancels_on_the_worker_and_finishes_here_at_once():
    client = StubClient()
    job = Job(client, "r1", "project")
    job.abandon("Cancelled: another file was opened")
    assert client.cancelled == ["r1"] and job.state == CANCELLED and job.finished
    assert job.status_text == "Cancelled" and job.error == "Cancelled: another file was opened"
    client.inbox = [{"id": "r1", "result": {"images": []}}]  # the worker's late answer changes nothing
    assert not job.poll() and job.state == CANCELLED


def _process_job(tmp_path: Path, script: str, count: int = 3):
    import subprocess

    from blender_sd_addon.jobs import ProcessJob

    outputs = [str(tmp_path / f"entry{i}" / "result.json") for i in range(count)]
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    return ProcessJob(None, "batch-1", "batch", process=process, outputs=outputs, log="batch.log", check_every=0.0)


def _poll_until_finished(job, seconds: float = 30.0) -> list[str]:
    seen, deadline = [], time.monotonic() + seconds
    while not job.finished and time.monotonic() < deadline:
        if job.poll():
            seen.append(job.status_text)
        time.sleep(0.02)
    return seen


WRITE_ENTRIES = """
import os, sys, time
for i in range({count}):
    time.sleep(0.3)
    os.makedirs(os.path.join(sys.argv[1], f"entry{{i}}"), exist_ok=True)
    open(os.path.join(sys.argv[1], f"entry{{i}}", "result.json"), "w").write("{{}}")
sys.exit({code})
"""


def test_a_process_job_counts_its_entries_and_ends_as_its_process(tmp_path):
    job = _process_job(tmp_path, WRITE_ENTRIES.format(count=3, code=0))
    assert job.state == RUNNING and job.status_text == "0 of 3 done"
    seen = _poll_until_finished(job)
    assert job.state == DONE and job.step == 3 and job.fraction == 1.0
    assert "1 of 3 done" in seen and "2 of 3 done" in seen  # progress while it ran

    failing = _process_job(tmp_path / "f", WRITE_ENTRIES.format(count=1, code=2), count=2)
    _poll_until_finished(failing)
    assert failing.state == FAILED and failing.step == 1
    assert failing.status_text == "Failed: the batch process stopped with exit status 2; see batch.log"


def test_cancelling_a_process_job_stops_its_process(tmp_path):
    job = _process_job(tmp_path, WRITE_ENTRIES.format(count=50, code=0), count=50)
    while job.step < 1:
        job.poll()
        time.sleep(0.02)
    job.cancel()
    assert job.status_text == "Cancelling…"
    _poll_until_finished(job, 10.0)
    assert job.state == CANCELLED and job.process.returncode != 0 and job.step < 50
