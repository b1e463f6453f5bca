"""Client supervision and RPC under stress: shutdown during a start, caller timeouts during a start, requests
racing with the worker's death, startup text on stdout. Each test would hang or fail on the first client."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blender_sd_addon.client import BACKEND_STOPPED, BackendClient, BackendError, SDTexError
from blender_sd_addon.contract import protocol
from blender_sd_addon.rpc import Rpc, Session
from blender_sd_addon.transport import Connection

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_client(mode: str, tmp_path: Path) -> BackendClient:
    return BackendClient([sys.executable, str(FAKE_WORKER), mode], log_path=tmp_path / "backend.log")


class ScriptedConnection(Connection):
    """An in-process connection: the test feeds the lines the "worker" writes and ends it at will."""

    def __init__(self):
        self.sent: list[bytes] = []
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self._alive = True

    def feed(self, *lines: bytes) -> None:
        for line in lines:
            self._lines.put(line)

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def lines(self) -> Iterator[bytes]:
        while (line := self._lines.get()) is not None:
            yield line

    def end(self) -> None:
        self._alive = False
        self._lines.put(None)

    def close(self, grace: float = 0.0) -> None:
        self.end()

    @property
    def alive(self) -> bool:
        return self._alive

    def stopped_reason(self) -> str:
        return "exit code 1"


def test_shutdown_during_a_slow_handshake_returns_within_a_second(tmp_path):
    client = fake_client("slow_handshake", tmp_path)  # the worker sleeps 10 s before it reads anything
    outcome: list = []
    starter = threading.Thread(target=lambda: outcome.append(_call(client.start, 30)))
    starter.start()
    queued = client.submit("load_model", {})
    _wait_for(lambda: "backend pid" in _read(tmp_path / "backend.log"))  # spawned, in its handshake

    began = time.monotonic()
    client.shutdown()
    assert time.monotonic() - began < 1.0
    starter.join(timeout=1.0)
    assert not starter.is_alive()
    assert isinstance(outcome[0], BackendError) and outcome[0].code == BACKEND_STOPPED
    assert "shut down while starting" in str(outcome[0])
    assert client.wait(queued, timeout=1)["error"]["code"] == BACKEND_STOPPED
    assert not client.alive and not client.starting


def test_caller_timeouts_bound_the_start(tmp_path):
    client = fake_client("slow_handshake", tmp_path)
    try:
        for call, match in (
            (lambda: client.request("load_model", {}, timeout=0.5), "did not finish within 0.5 s"),
            (lambda: client.wait(client.submit("load_model", {}), timeout=0.5), "did not finish within 0.5 s"),
            (lambda: client.start(timeout=0.5), "did not start within 0.5 s"),
        ):
            began = time.monotonic()
            with pytest.raises(SDTexError, match=match):
                call()
            assert time.monotonic() - began < 1.5
        assert len(client._rpc._mail) == 1  # the abandoned requests left nothing; the start's handshake goes on
    finally:
        client.shutdown()


def test_requests_racing_with_the_end_of_a_session_are_always_answered():
    """The open-request set and the closed flag change together: a request sent while the reader answers
    every open request at EOF is either among them or refused at once, never lost in between."""
    rpc = Rpc()
    for _ in range(300):
        connection = ScriptedConnection()
        session = Session(rpc, connection)
        ender = threading.Thread(target=connection.end)
        ender.start()
        request_id = rpc.open()
        session.send(request_id, b"{}\n")
        reply = rpc.wait(request_id, timeout=1.0)  # RequestTimeout here is the lost request
        ender.join()
        assert reply["error"]["code"] == BACKEND_STOPPED
        assert reply["error"]["message"].startswith("backend stopped, exit code 1:")


def test_requests_racing_with_worker_death_get_an_answer_within_a_second(tmp_path):
    client = fake_client("die_on_run", tmp_path)
    try:
        client.start(timeout=30)
        dying = client.submit(protocol.RUN, {"task": "txt2img"})
        racing = [client.submit("load_model", {"n": n}) for n in range(20)]
        assert client.wait(dying, timeout=5)["error"]["code"] == BACKEND_STOPPED
        for request_id in racing:
            began = time.monotonic()
            reply = client.wait(request_id, timeout=5)
            # Sent before the death was noticed: an error; after it: a restarted worker answers.
            assert reply.get("error", {}).get("code") == BACKEND_STOPPED or reply["result"]["echo"]["n"] >= 0
            assert time.monotonic() - began < 1.0
    finally:
        client.shutdown()


def test_handshake_survives_startup_text_on_stdout(tmp_path):
    client = fake_client("junk", tmp_path)  # a banner line, then text on the handshake reply's own line
    try:
        shake = client.start(timeout=10)
        assert shake.backend_version == "fake"
        assert client.request("load_model", {"model": "m"}, timeout=10) == {"echo": {"model": "m"}}
    finally:
        client.shutdown()


def test_unreadable_lines_are_skipped_and_quoted_when_the_worker_stops():
    rpc = Rpc()
    reply = protocol.encode(protocol.result("r1", {"ok": True}))
    connection = ScriptedConnection()
    session = Session(rpc, connection)
    first, second = rpc.open(), rpc.open()
    assert first == "r1"
    session.send(first, b"{}\n")
    session.send(second, b"{}\n")
    connection.feed(b"\n", b"banner from a library\n", b"warming up... " + reply, b"\xff\xfe\n")
    assert rpc.wait(first, timeout=5) == {"id": "r1", "result": {"ok": True}}
    connection.end()
    message = rpc.wait(second, timeout=5)["error"]["message"]
    assert "Unreadable output on stdout:\nbanner from a library\nwarming up..." in message


def _call(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - handed to the test thread to assert on
        return exc


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
