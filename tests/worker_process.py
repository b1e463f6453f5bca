"""`python -m backend serve` as a subprocess, driven in raw JSON lines (shared by the backend tests).

A module of its own, not conftest.py: tests/addon/ has a conftest too, and `from conftest import ...`
would pick whichever was imported first.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sdtex_contract.protocol import is_terminal

REPO = Path(__file__).resolve().parents[1]


class WorkerProcess:
    """`python -m backend serve` in a subprocess, spoken to in raw JSON lines."""

    def __init__(self, env: dict | None = None, command: list[str] | None = None, banner: bool = False):
        self.stderr = tempfile.TemporaryFile()  # a file, so a chatty worker can never block on a full pipe
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "backend", "serve"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        self.messages: queue.Queue = queue.Queue()
        self._counter = 0
        threading.Thread(target=self._read, args=(banner,), daemon=True).start()

    def _read(self, banner: bool) -> None:
        if banner:  # stray text the command printed before the worker took stdout over, ended by the worker
            self.banner = self.proc.stdout.readline()
        for line in self.proc.stdout:
            if line == b"\n":  # the worker ends any partial line stray startup output left, once, at start
                continue
            self.messages.put(json.loads(line))  # anything but JSON on stdout is a bug: let it fail loudly
        self.messages.put(None)

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message: dict) -> None:
        self.send_raw((json.dumps(message) + "\n").encode())

    def request(self, method: str, params: dict | None = None) -> str:
        self._counter += 1
        request_id = f"t{self._counter}"
        self.send({"id": request_id, "method": method, "params": params or {}})
        return request_id

    def recv(self, timeout: float = 120) -> dict:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from the worker in {timeout}s; stderr:\n{self.stderr_text()}") from None
        assert message is not None, f"worker closed stdout; stderr:\n{self.stderr_text()}"
        return message

    def wait(self, request_id: str, timeout: float = 120) -> tuple[dict, list[dict]]:
        """(terminal reply, events before it) for one request."""
        events, deadline = [], time.monotonic() + timeout
        while True:
            message = self.recv(max(deadline - time.monotonic(), 0.1))
            assert message.get("id") == request_id, f"unexpected message {message}"
            if "event" in message:
                events.append(message)
            else:
                return message, events

    def collect(self, ids: list[str], timeout: float = 120) -> dict[str, list[dict]]:
        """Every message for each id, in order, until each has its terminal reply (any interleaving)."""
        seen: dict[str, list[dict]] = {i: [] for i in ids}
        deadline = time.monotonic() + timeout
        while any(not m or not is_terminal(m[-1]) for m in seen.values()):
            message = self.recv(max(deadline - time.monotonic(), 0.1))
            assert message.get("id") in seen, f"unexpected message {message}"
            seen[message["id"]].append(message)
        return seen

    def call(self, method: str, params: dict | None = None, timeout: float = 120) -> tuple[dict, list[dict]]:
        return self.wait(self.request(method, params), timeout)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def close(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF: the worker exits 0
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode
