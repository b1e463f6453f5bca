"""The stdio transport: stderr drained whatever happens to the log, the log rotated, and a stopped worker
described by its exit and its last traceback (not by whatever warning came last)."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import pytest

from blender_sd_addon import transport
from blender_sd_addon.client import BACKEND_STOPPED, BackendClient
from blender_sd_addon.contract import protocol
from blender_sd_addon.transport import LogFile, describe_exit, error_lines

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_client(mode: str, tmp_path: Path) -> BackendClient:
    return BackendClient([sys.executable, str(FAKE_WORKER), mode], log_path=tmp_path / "backend.log")


class FlakyDisk:
    """A log file whose writes fail with ENOSPC while `full` is set."""

    full = True

    def __init__(self, path: Path):
        self._file = open(path, "ab")  # noqa: SIM115 - closed by close()

    def write(self, data: bytes) -> int:
        if FlakyDisk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def seek(self, offset: int, whence: int) -> int:
        return self._file.seek(offset, whence)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def test_a_full_disk_never_stops_the_stderr_drain(tmp_path, monkeypatch):
    monkeypatch.setattr(FlakyDisk, "full", True)
    monkeypatch.setattr(LogFile, "_open", lambda self: FlakyDisk(self.path))
    client = fake_client("chatty", tmp_path)  # writes 2 MB to stderr before each reply
    try:
        # With a drain that died on its log write, the pipe fills and the worker blocks: no reply.
        assert client.request("load_model", {"model": "a"}, timeout=20) == {"echo": {"model": "a"}}
        assert client.request("load_model", {"model": "b"}, timeout=20) == {"echo": {"model": "b"}}

        client.shutdown()
        # Space is back: writes resume, noting first what was lost. (The worker wrote its 2 MB before replying,
        # so at most a pipe's worth is still draining: the log rotates once, and .1 keeps the note.)
        FlakyDisk.full = False
        assert client.request("load_model", {"model": "c"}, timeout=20) == {"echo": {"model": "c"}}
        client.shutdown()
        log = (tmp_path / "backend.log").read_bytes() + (tmp_path / "backend.log.1").read_bytes()
        assert b"log write(s) lost: the log could not be written]" in log
        assert log.count(b"chatty log line") > 1000
    finally:
        client.shutdown()


def test_the_log_rotates_at_its_limit_keeping_one_old_file(tmp_path):
    log = LogFile(tmp_path / "backend.log", max_bytes=1000)
    for n in range(100):
        log.write(f"line {n:03} ".ljust(99, ".") + "\n")
    current, old = (tmp_path / "backend.log").read_text(), (tmp_path / "backend.log.1").read_text()
    assert len(current) <= 1000 and len(old) <= 1000
    assert current.endswith("line 099 " + "." * 90 + "\n") and "line 089" in old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backend.log", "backend.log.1"]

    reopened = LogFile(tmp_path / "backend.log", max_bytes=1000)  # a new session continues the count
    reopened.write("x" * 200)
    assert (tmp_path / "backend.log").stat().st_size <= 1000


def test_a_log_that_cannot_be_opened_loses_lines_quietly(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    log = LogFile(blocker / "backend.log")
    log.write("lost\n")  # raises nothing
    blocker.unlink()
    log.write("kept\n")
    assert (blocker / "backend.log").read_text() == "[1 log write(s) lost: the log could not be written]\nkept\n"


def test_stopped_message_quotes_the_traceback_names_the_exit_and_the_log(tmp_path):
    client = fake_client("die_on_run", tmp_path)  # a torchvision warning first, then a traceback
    try:
        error = client.wait(client.submit(protocol.RUN, {"task": "txt2img"}), timeout=30)["error"]
    finally:
        client.shutdown()
    lines = error["message"].splitlines()
    assert lines[0] == "backend stopped, exit code 3: RuntimeError: the fake worker fell over"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == f"Full log: {tmp_path / 'backend.log'}"
    assert "torchvision" not in error["message"]
    assert error["code"] == BACKEND_STOPPED and error["data"]["reason"] == "exit code 3"


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_stopped_message_names_a_kill_and_skips_warnings(tmp_path):
    client = fake_client("killed", tmp_path)  # warnings on stderr, then SIGKILL as the OOM killer would
    try:
        message = client.wait(client.submit(protocol.RUN, {"task": "txt2img"}), timeout=30)["error"]["message"]
    finally:
        client.shutdown()
    assert message.splitlines()[0] == (
        "backend stopped, killed by SIGKILL (out of memory?): no error message on stderr"
    )
    assert "Warning" not in message and "backend.log" in message


def test_exit_descriptions():
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(None) == "still running"
    if os.name != "nt":
        assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"


def test_error_lines_prefer_the_last_traceback_and_skip_warnings():
    tail = [
        "UserWarning: something is deprecated",
        "Traceback (most recent call last):",
        '  File "a.py"',
        "ValueError: first",
        "INFO retrying",
        "Traceback (most recent call last):",
        *[f'  File "b.py", line {n}' for n in range(20)],
        "torch.OutOfMemoryError: CUDA out of memory",
    ]
    quoted = error_lines(tail)
    assert quoted[0] == "Traceback (most recent call last):" and quoted[1] == "  …"
    assert quoted[-1] == "torch.OutOfMemoryError: CUDA out of memory" and len(quoted) == 12
    assert error_lines(["UserWarning: x", "Fatal Python error: Aborted", "done"]) == ["Fatal Python error: Aborted"]
    # A crash after a handled, logged traceback is the news; lines after a traceback are not part of it.
    logged = ["Traceback (most recent call last):", '  File "a.py"', "ValueError: handled", "INFO next request"]
    crash = "Fatal Python error: Segmentation fault"
    assert error_lines([*logged, crash]) == [crash]
    assert error_lines(logged)[-1] == "ValueError: handled"
    assert describe_exit(0xC0000005) == "exit code 0xc0000005"
    assert error_lines(["FutureWarning: an error someday"]) == []
    assert transport.STDERR_LINE_MAX >= 1024
