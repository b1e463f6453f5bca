"""RPC over a Connection: request ids, one mailbox per request, exactly one terminal reply each.

Stdlib only, no bpy. `Rpc` holds the mailboxes of one client across the workers it has run; a `Session` is
one connection's share: a writer thread, a reader thread that files each message into its request's mailbox,
and the set of requests still waiting for their terminal reply. When the connection ends, every open request
of the session gets a `backend_stopped` error quoting why; a request sent after that gets one at once.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from .contract import protocol
from .transport import Connection

BACKEND_STOPPED = "backend_stopped"  # synthetic error code: the worker stopped with the request open
BACKEND_START_FAILED = "backend_start_failed"  # synthetic error code: the worker could not be started


class SDTexError(Exception):
    """A problem the user can act on; the message says what went wrong and what to do."""


class BackendError(SDTexError):
    """An error reply from the worker (or a synthetic one when it stopped or did not start)."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.data = data or {}


class RequestTimeout(SDTexError):
    """wait() gave up; the request's mailbox is closed."""


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """A caller's timeout as the waits take it: seconds >= 0, or None for no timeout. `inf` means no timeout
    too (returned as None); NaN is refused (it compares false with everything, so every deadline check would
    pass and it would silently wait forever), as are negatives and non-numbers."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise SDTexError(f"{name} must be a number of seconds >= 0, or None or inf for no timeout; got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


class Rpc:
    """The mailboxes of one client's requests.

    A mailbox opens with the request and closes once its terminal reply has been collected, or when the
    caller forgets the request; messages for a closed mailbox are dropped, so abandoned requests leave nothing.
    """

    def __init__(self) -> None:
        self.lock = threading.Condition()  # guards the mailboxes and the open-request set of every session
        self._mail: dict[str, list[dict]] = {}
        self._ids = itertools.count(1)
        # Takes a message before its mailbox sees it (True: taken; it comes back through pass_on). A remote
        # client's result files are fetched this way before the result is delivered (remote.RemoteFiles).
        self.hold: Callable[[str, dict], bool] | None = None

    def open(self) -> str:
        """A new request id with an empty mailbox."""
        request_id = f"r{next(self._ids)}"
        with self.lock:
            self._mail[request_id] = []
        return request_id

    def deliver(self, request_id: str, message: dict) -> None:
        """File a message (the caller holds `lock`)."""
        if self.hold is not None and self.hold(request_id, message):
            return
        self._put(request_id, message)

    def pass_on(self, request_id: str, message: dict) -> None:
        """File a message `hold` took, past `hold`."""
        with self.lock:
            self._put(request_id, message)

    def _put(self, request_id: str, message: dict) -> None:
        box = self._mail.get(request_id)
        if box is not None:
            box.append(message)
            self.lock.notify_all()

    def answer(self, request_id: str, message: dict) -> None:
        """File a terminal reply made on this side (a request that never reached a worker)."""
        with self.lock:
            self.deliver(request_id, message)

    def messages(self, request_id: str) -> list[dict]:
        """The messages received for a request since the last call; non-blocking (Blender's timer)."""
        with self.lock:
            return self._take(request_id) if self._mail.get(request_id) else []

    def wait(
        self, request_id: str, on_event: Callable[[dict], None] | None = None, timeout: float | None = None
    ) -> dict:
        """Block until the request's terminal reply, passing its events to on_event; return the reply.

        RequestTimeout after `timeout` seconds (None or inf: no timeout); the mailbox is then closed (forgotten).
        """
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                while not self._mail.get(request_id):
                    if request_id not in self._mail:
                        raise SDTexError(f"No open request {request_id!r}: its reply was collected or forgotten")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        del self._mail[request_id]
                        raise RequestTimeout(f"The backend did not answer within {timeout:g} s")
                    self.lock.wait(1.0 if left is None else min(left, 1.0))  # short waits: Ctrl+C stays responsive
                batch = self._take(request_id)
            for message in batch:
                if protocol.is_terminal(message):
                    return message
                if on_event:
                    on_event(message)

    def forget(self, request_id: str) -> None:
        """Close the mailbox: drop what it holds and whatever still arrives for the request."""
        with self.lock:
            self._mail.pop(request_id, None)

    def _take(self, request_id: str) -> list[dict]:
        box = self._mail[request_id]
        if box and protocol.is_terminal(box[-1]):  # nothing follows a terminal reply: close the mailbox
            del self._mail[request_id]
        else:
            self._mail[request_id] = []
        return box

    @staticmethod
    def result(message: dict) -> dict:
        """The result of a terminal reply; BackendError for an error, SDTexError("Cancelled") when cancelled."""
        if "error" in message:
            error = message["error"] or {}
            raise BackendError(error.get("code", ""), error.get("message", "unknown backend error"), error.get("data"))
        if message.get("cancelled"):
            raise SDTexError("Cancelled")
        return message["result"]


class Session:
    """The requests of one connection: sent in order by a writer thread, answered via a reader thread.

    `send` never blocks on the worker (a hung worker must not freeze Blender's main thread); the writer
    thread does the blocking writes. The open-request set and the `closed` flag change under `rpc.lock`
    together, so a request is either answered by the reader at EOF or refused at once, never lost between.
    """

    def __init__(self, rpc: Rpc, connection: Connection):
        self.rpc = rpc
        self.connection = connection
        self.uploaded: set[str] = set()  # sha256 of the bytes this worker process holds
        self.closed = False
        self._pending: set[str] = set()
        self._stopped: protocol.ProtocolError | None = None
        self._shutting_down = False
        self.junk: deque[str] = deque(maxlen=5)  # unreadable stdout lines, quoted in error messages
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=self._write, daemon=True, name="sdtex-writer").start()
        threading.Thread(target=self._read, daemon=True, name="sdtex-reader").start()

    @property
    def usable(self) -> bool:
        return not self.closed and self.connection.alive

    def send(self, request_id: str, data: bytes) -> None:
        """Queue an encoded request whose mailbox is open; a closed session answers it with its stop error."""
        with self.rpc.lock:
            if self.closed:
                self.rpc.deliver(request_id, protocol.error(request_id, self._stopped))
                return
            self._pending.add(request_id)
            self._outbox.put(data)

    def notify(self, data: bytes) -> None:
        """Queue an encoded notification (no reply)."""
        with self.rpc.lock:
            if not self.closed:
                self._outbox.put(data)

    def has(self, request_id: str) -> bool:
        """Whether the request was sent here and still waits for its terminal reply."""
        with self.rpc.lock:
            return request_id in self._pending

    def close(self, grace: float = 0.0) -> None:
        """End the connection (after `grace` s for a worker that was asked to leave); open requests get an error."""
        self._shutting_down = True
        self.connection.close(grace)

    def _write(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self.connection.send(data)
            except OSError:
                return  # the worker is gone: the reader sees the end and answers every open request

    def _read(self) -> None:
        for line in self.connection.lines():
            self._file(line)
        self.connection.close(grace=1.0)  # stdout ended: make sure the process is gone and its stderr read
        stopped = protocol.ProtocolError(BACKEND_STOPPED, *self._stopped_message())
        with self.rpc.lock:
            self.closed, self._stopped = True, stopped
            for request_id in self._pending:
                self.rpc.deliver(request_id, protocol.error(request_id, stopped))
            self._pending.clear()
        self._outbox.put(None)  # ends the writer, if a write is not stuck on the dead worker

    def _file(self, line: bytes) -> None:
        if not line.strip():
            return  # the worker's leading newline (it ends any startup text printed before it took over)
        try:
            message = protocol.decode(line)
        except protocol.ProtocolError:
            message = self._salvage(line)
            if message is None:
                return
        request_id = protocol.request_id_of(message)
        if request_id is None:
            if "error" in message:  # e.g. a parse error about a line the worker could not read
                self.junk.append(f"error without a request id: {protocol.shown(message['error'], 200)}")
            return
        with self.rpc.lock:
            if request_id not in self._pending:
                return  # a late message for a request answered already (e.g. by a synthetic error)
            if protocol.is_terminal(message):
                self._pending.discard(request_id)
            self.rpc.deliver(request_id, message)

    def _salvage(self, line: bytes) -> dict | None:
        """Keep an unreadable line for the error message; recover a message that startup text ran into."""
        start = line.find(b'{"')
        self.junk.append(line[: start if start > 0 else 200].decode("utf-8", "replace").strip()[:200])
        if start > 0:
            try:
                return protocol.decode(line[start:])
            except protocol.ProtocolError:
                return None
        return None

    def _stopped_message(self) -> tuple[str, dict]:
        """What the stop error says: how the worker ended, its last traceback, where the full log is."""
        reason = self.connection.stopped_reason()
        lines = [] if self._shutting_down else self.connection.error_lines()
        log = self.connection.log_path
        data = {"reason": reason, "stderr": lines, "log": str(log) if log else None}
        if self._shutting_down:
            return f"backend stopped: it was shut down ({reason})", data
        text = f"backend stopped, {reason}: " + (lines[-1] if lines else "no error message on stderr")
        if len(lines) > 1:
            text += "\n" + "\n".join(lines)
        if self.junk:
            text += "\nUnreadable output on stdout:\n" + "\n".join(self.junk)
        if log:
            text += f"\nFull log: {log}"
        return text, data
