"""BackendClient: runs the backend worker as a subprocess and talks protocol.py to it.

Stdlib only and free of bpy, so it can be tested with plain pytest. A reader thread files every
message from the worker's stdout into a mailbox per request id; callers collect their own messages
with `messages(id)` (non-blocking, for Blender's timer) or `wait(id)` (blocking, for background mode).
A worker that dies answers each of its open requests with a synthetic error that quotes its stderr,
and the next request starts a fresh worker.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from . import protocol

BACKEND_STOPPED = "backend_stopped"  # synthetic error code: the worker exited with requests open


class SDTexError(Exception):
    """A problem the user can act on; the message says what went wrong and what to do."""


class BackendError(SDTexError):
    """An error reply from the worker (or a synthetic one when it died)."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.data = data or {}


class BackendClient:
    """One worker process at a time, started on demand.

    command: the worker's command line, e.g. [python, "-m", "backend", "serve"].
    pythonpath: folders put on the worker's PYTHONPATH (where `backend` and `blender_sd_addon` live).
    log_path: the worker's stderr is appended here (and its last lines kept for error messages).
    """

    def __init__(self, command: Sequence[str], pythonpath: Sequence[str] = (), log_path: Path | None = None):
        self.command = list(command)
        self.pythonpath = list(pythonpath)
        self.log_path = log_path
        self.handshake: protocol.HandshakeResult | None = None
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._eof = threading.Event()  # set by the reader thread when the current worker's stdout closes
        self._pending: set[str] = set()  # requests of the current worker without a terminal reply
        self._mail: dict[str, list[dict]] = {}
        self._stderr_tail: deque[str] = deque(maxlen=30)
        self._cond = threading.Condition()  # guards _mail and _pending
        self._write_lock = threading.Lock()
        self._start_lock = threading.RLock()

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._eof.is_set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.alive else None

    def start(self, timeout: float | None = 300) -> protocol.HandshakeResult:
        """Start the worker unless it runs, and handshake. Raises SDTexError on any failure."""
        with self._start_lock:
            if self.alive and self.handshake:
                return self.handshake
            self._spawn()
            request_id = self._send(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION})
            try:
                reply = self.result(self.wait(request_id, timeout=timeout))
                protocol.check_protocol_version(reply.get("protocol_version"))
                known = protocol.HandshakeResult.__dataclass_fields__
                self.handshake = protocol.HandshakeResult(**{k: v for k, v in reply.items() if k in known})
            except protocol.ProtocolError as exc:
                self._stop_process()
                raise SDTexError(f"Backend {exc.message}") from None
            except (SDTexError, TypeError) as exc:
                self._stop_process()
                raise SDTexError(f"The backend did not start: {exc}") from None
            return self.handshake

    def shutdown(self, timeout: float = 3.0) -> None:
        """Ask the worker to exit, then terminate it, then kill it. Open requests get an error."""
        with self._start_lock:
            if self._proc is None:
                return
            if self.alive:
                try:
                    self._send(protocol.SHUTDOWN, {})
                except SDTexError:
                    pass
            self._stop_process(timeout, polite=True)

    def _spawn(self) -> None:
        self._stop_process()
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)  # Blender's own Python home would break another interpreter
        env["PYTHONPATH"] = os.pathsep.join(self.pythonpath)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window on Windows
            )
        except OSError as exc:
            raise SDTexError(f"Cannot start the backend with {self.command[0]!r}: {exc}") from None
        self._proc, self.handshake = proc, None
        self._eof = threading.Event()
        self._stderr_tail.clear()
        stderr_thread = threading.Thread(target=self._read_stderr, args=(proc,), daemon=True, name="sdtex-stderr")
        stderr_thread.start()
        threading.Thread(
            target=self._read_stdout, args=(proc, self._eof, stderr_thread), daemon=True, name="sdtex-stdout"
        ).start()

    def _stop_process(self, timeout: float = 3.0, polite: bool = False) -> None:
        """Wait for the worker to exit (polite: it was asked to), else terminate it, else kill it."""
        proc = self._proc
        if proc is None:
            return
        for stop in ((None,) if polite else ()) + (proc.terminate, proc.kill):
            if stop:
                stop()
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self._eof.wait(timeout)  # the reader thread answers the open requests
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass

    # --- reader threads -------------------------------------------------------------------------

    def _read_stdout(self, proc: subprocess.Popen, eof: threading.Event, stderr_thread: threading.Thread) -> None:
        for line in proc.stdout:
            try:
                message = protocol.decode(line)
            except protocol.ProtocolError:
                self._stderr_tail.append(f"(unreadable stdout line) {line[:200]!r}")
                continue
            request_id = message.get("id")
            if not isinstance(request_id, str):
                continue  # e.g. a parse error about a line we never sent: nothing waits for it
            with self._cond:
                if protocol.is_terminal(message):
                    self._pending.discard(request_id)
                self._mail.setdefault(request_id, []).append(message)
                self._cond.notify_all()
        code = proc.wait()
        stderr_thread.join(timeout=2)
        tail = "\n".join(list(self._stderr_tail)[-8:]) or "(no output on stderr)"
        error = protocol.ProtocolError(BACKEND_STOPPED, f"backend stopped (exit code {code}): {tail}")
        with self._cond:
            for request_id in self._pending:
                self._mail.setdefault(request_id, []).append(protocol.error(request_id, error))
            self._pending.clear()
            eof.set()
            self._cond.notify_all()

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        log = None
        if self.log_path:
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(self.log_path, "ab")  # noqa: SIM115 - closed below, lives as long as the worker
            except OSError:
                log = None
        try:
            for line in proc.stderr:
                if log:
                    log.write(line)
                    log.flush()
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self._stderr_tail.append(text)
        finally:
            if log:
                log.close()

    # --- requests -------------------------------------------------------------------------------

    def submit(self, method: str, params: dict | None = None) -> str:
        """Send a request (starting the worker first when needed); return its id."""
        with self._start_lock:
            if not self.alive:
                self.start()
            return self._send(method, params or {})

    def _send(self, method: str, params: dict) -> str:
        request_id = f"r{next(self._ids)}"
        with self._cond:
            self._pending.add(request_id)
        self._write(protocol.request(request_id, method, params))
        return request_id

    def _write(self, message: dict) -> None:
        proc = self._proc
        if proc is None:
            raise SDTexError("The backend is not running")
        with self._write_lock:
            try:
                proc.stdin.write(protocol.encode(message))
                proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the worker is gone: the reader thread answers the open requests with an error

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop a request; it answers with a `cancelled` terminal reply."""
        if self.alive:
            self._write(protocol.notification(protocol.CANCEL, {"id": request_id}))

    def messages(self, request_id: str) -> list[dict]:
        """Messages received for one request since the last call (non-blocking)."""
        with self._cond:
            return self._mail.pop(request_id, [])

    def wait(
        self, request_id: str, on_event: Callable[[dict], None] | None = None, timeout: float | None = None
    ) -> dict:
        """Block until the request's terminal reply, passing events to on_event; return the reply.

        On timeout the request is cancelled and SDTexError raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if request_id not in self._mail:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self.cancel(request_id)
                        raise SDTexError(f"The backend did not finish within {timeout:g} s; the request was cancelled")
                    self._cond.wait(0.5 if left is None else min(left, 0.5))
                batch = self._mail.pop(request_id, [])
            for message in batch:
                if protocol.is_terminal(message):
                    return message
                if on_event:
                    on_event(message)

    def request(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        """submit + wait + result, for simple calls."""
        return self.result(self.wait(self.submit(method, params), timeout=timeout))

    @staticmethod
    def result(message: dict) -> dict:
        """The result of a terminal reply; BackendError for an error, SDTexError when cancelled."""
        if "error" in message:
            error = message["error"] or {}
            raise BackendError(error.get("code", ""), error.get("message", "unknown backend error"), error.get("data"))
        if message.get("cancelled"):
            raise SDTexError("Cancelled")
        return message["result"]
