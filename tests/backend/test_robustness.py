"""Hostile input, a full disk, a dead parent and SIGKILL: the worker answers, cleans up and keeps serving."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image
from worker_process import REPO, WorkerProcess

from backend.outputs import TEMP_PREFIX
from sdtex_contract import protocol

KILLED_JOBS = int(os.environ.get("SDTEX_KILLED_JOBS", "50"))


@pytest.fixture
def params(run_params):
    return {**run_params, "seed": 5}


# --- fuzz ------------------------------------------------------------------------------------------

HOSTILE_VALUES = [
    None, True, -1, 0, 2**64, 10**400, -(10**400), 1e308, 0.5, "", " ", "\x00", "\ud800", "é" * 5000,
    "../../etc/passwd", [], [1, [2]], {}, {"path": 1}, {"sha256": "x"}, "NaN", "9" * 400,
]  # fmt: skip
RAW_LINES = [
    b"\xff\xfe\xfd\n", b"{\n", b"null\n", b'"text"\n', b"[]\n", b'{"id": NaN, "method": "jobs"}\n',
    b'{"id": "n", "method": "run", "params": {"steps": Infinity}}\n',
    b'{"id": "n", "method": "run", "params": {"guidance_scale": -Infinity}}\n',
    b"[" * 5000 + b"]" * 5000 + b"\n", b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"\n",
    b'{"id": "\\ud800", "method": "jobs"}\n', b'{"id": "s", "method": "jobs", "params": {}, "x": "\\udfff"}\n',
]  # fmt: skip


def fuzz_lines(rng: random.Random, count: int) -> list[bytes]:
    """Lines that must each get exactly one terminal reply (no notifications, no shutdown, no slow job)."""
    params_names = [p.name for table in protocol.TASK_PARAMS.values() for p in table] + ["image", "data", "path"]
    methods = [m for m in protocol.METHODS if m != protocol.SHUTDOWN] + ["paint", 3, None]
    lines = []
    for n in range(count):
        kind = n % 4
        if kind == 0:
            lines.append(rng.choice(RAW_LINES))
            continue
        message: dict = {"id": rng.choice([f"f{n}", n, f"f{n}" * 50])}
        message["method"] = rng.choice(methods)
        params = {name: rng.choice(HOSTILE_VALUES) for name in rng.sample(params_names, rng.randint(1, 6))}
        if kind == 2:
            params["task"] = rng.choice(["txt2img", "pbr", "x"])
            params["model"] = rng.choice(["", "\ud800", 7])  # never a loadable job: every line is answered fast
        message["params"] = params if kind != 3 else rng.choice(HOSTILE_VALUES)
        if message["method"] == protocol.CANCEL and rng.random() < 0.5:
            message["params"] = {"id": rng.choice([[1], {"a": 1}, None, 1.5])}
        lines.append((json.dumps(message, allow_nan=True) + "\n").encode("utf-8", "surrogatepass"))
    return lines


def test_fuzz_every_line_is_answered_and_the_worker_serves_afterwards(params):
    rng = random.Random(1234)
    lines = fuzz_lines(rng, 10_000)
    big = b'{"id": "big", "method": "run", "params": {"task": "txt2img", "prompt": "' + b"x" * 10_000_000 + b'"}}\n'
    lines[5000:5000] = [big, b"y" * (protocol.MAX_LINE + 10) + b"\n"]  # a 10 MB line and an over-long one
    worker = WorkerProcess()
    try:
        writer = __import__("threading").Thread(target=lambda: [worker.send_raw(line) for line in lines])
        writer.start()
        # Every line gets exactly one terminal reply; jobs (a list_models job can be valid) also send events.
        replies = []
        while len(replies) < len(lines):
            message = worker.recv(timeout=120)
            if "event" not in message:
                replies.append(message)
        writer.join()
        assert all(protocol.is_terminal(r) for r in replies)
        assert all(len(json.dumps(r)) < 20_000 for r in replies)  # errors show values, never echo them
        codes = {r["error"]["code"] for r in replies if "error" in r}
        assert protocol.INTERNAL_ERROR not in codes, codes  # every refusal is a named error, never a crash
        assert protocol.PARSE_ERROR in codes and protocol.INVALID_PARAMS in codes
        # Still serving: a real job after all that.
        reply, _ = worker.call(protocol.RUN, params)
        assert reply["result"]["images"]
        assert worker.proc.poll() is None
    finally:
        assert worker.close() == 0


# --- full disk ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root, as on CI)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.fail(f"the full-disk test needs `mount -t tmpfs` (root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk until about `leave` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    stat = os.statvfs(disk)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    assert abs(os.statvfs(disk).f_bavail * stat.f_frsize - leave) <= 8192
    return filler


def test_full_disk_ends_jobs_with_an_error_naming_the_folder_and_recovers(worker, params, small_disk):
    out = small_disk / "textures"
    out.mkdir()
    job = {**params, "output_dir": str(out), "batch_size": 2, "pbr": True}
    filler = fill(small_disk, leave=0)
    reply, events = worker.call(protocol.RUN, job)
    assert reply["error"]["code"] == protocol.OUTPUT_FAILED and str(out) in reply["error"]["message"]
    assert "disk is full" in reply["error"]["message"]
    # Checked before the expensive part: no denoising step ran.
    assert not [e for e in events if e["event"] == protocol.EVENT_PROGRESS]

    # Room for the first files only: the job fails mid-save; what was announced is complete, nothing partial.
    filler.unlink()
    filler = fill(small_disk, leave=40_000)
    reply, events = worker.call(protocol.RUN, job)
    assert reply["error"]["code"] == protocol.OUTPUT_FAILED and str(out) in reply["error"]["message"]
    announced = [e["data"]["path"] for e in events if e["event"] == protocol.EVENT_ARTIFACT]
    assert announced and sorted(announced) == sorted(str(p) for p in out.iterdir())
    for path in announced:
        with Image.open(path) as image:
            image.load()  # complete files only
    assert not list(out.glob(TEMP_PREFIX + "*"))

    filler.unlink()  # space again: the same worker serves the same job
    reply, events = worker.call(protocol.RUN, job)
    assert len(reply["result"]["artifacts"]) == 10


# --- the client goes away -------------------------------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import json, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-m", "backend", "serve"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    request = {"id": "long", "method": "run", "params": json.loads(sys.argv[1])}
    worker.stdin.write((json.dumps(request) + "\\n").encode())
    worker.stdin.flush()
    for line in worker.stdout:
        if b'"progress"' in line:
            print(worker.pid, flush=True)
            break
    time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited


def test_killing_the_parent_mid_job_ends_the_worker_within_5_s(params):
    job = {**params, "steps": 150, "width": 128, "height": 128}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, json.dumps(job)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        worker_pid = int(parent.stdout.readline())
        parent.kill()  # SIGKILL: no cleanup in the parent; the worker sees its stdin end
        parent.wait()
        start = time.monotonic()
        while alive(worker_pid) and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert not alive(worker_pid), "the orphaned worker kept running its job"
        assert time.monotonic() - start < 5
    finally:
        parent.kill()


# --- SIGKILL at random points ---------------------------------------------------------------------------


def test_sigkill_at_random_points_never_leaves_a_partial_file(params, tmp_path):
    """Each job ends with a clear error (the worker died) or a complete result, and no final name ever holds a
    truncated file; the next worker always serves."""
    rng = random.Random(7)
    out = tmp_path / "out"
    job = {**params, "batch_size": 2, "pbr": True, "output_dir": str(out)}
    complete = 0
    for n in range(KILLED_JOBS):
        worker = WorkerProcess()
        worker.call(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION})  # started: kill mid-job
        request_id = worker.request(protocol.RUN, {**job, "seed": n})
        deadline = time.monotonic() + rng.uniform(0.0, 2.5)
        reply = None
        while time.monotonic() < deadline and reply is None:
            try:
                message = worker.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                break
            if message and protocol.is_terminal(message):
                reply = message
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        worker.close()
        if reply is not None:
            assert reply["id"] == request_id and len(reply["result"]["artifacts"]) == 10
            complete += 1
        for path in out.glob("*.png"):
            with Image.open(path) as image:
                image.load()  # raises on a truncated file
    worker = WorkerProcess()
    try:
        reply, _ = worker.call(protocol.RUN, {**job, "seed": 999})
        assert len(reply["result"]["artifacts"]) == 10
    finally:
        worker.close()
    assert complete < KILLED_JOBS  # most kills landed mid-job
