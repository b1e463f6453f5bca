"""BackendClient: supervises one backend worker at a time and talks protocol.py to it.

Stdlib only and free of bpy, so it can be tested with plain pytest. Three layers:

- transport.py  a Connection moves JSON lines (StdioConnection: the worker as a child process; TcpConnection:
                a remote worker, whose files remote.RemoteFiles moves so that it looks local);
- rpc.py        request ids, a mailbox per request, exactly one terminal reply each;
- this module   supervision: start (spawn + handshake) on a thread, restart on the next request after the
                worker died, shutdown -> wait -> terminate -> kill; and the facade the add-on calls.

`submit` never blocks: while the worker starts, requests queue here and go out in order after the handshake
(or are answered with the start error). So a caller's timeout on `wait`/`request` bounds the start too, and
Blender's main thread never waits for torch to import.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .contract import protocol
from .remote import RemoteFiles, RemoteSettings
from .rpc import (
    BACKEND_START_FAILED,
    BACKEND_STOPPED,
    BackendError,
    RequestTimeout,
    Rpc,
    SDTexError,
    Session,
    check_timeout,
)
from .transport import Connection, LogFile, StdioConnection, TcpConnection

__all__ = ["BACKEND_START_FAILED", "BACKEND_STOPPED", "BackendClient", "BackendError", "SDTexError"]


@dataclass
class _Start:
    """One attempt to start a worker, shared by everyone who waits for it."""

    done: threading.Event = field(default_factory=threading.Event)
    session: Session | None = None  # once spawned, so shutdown can stop it mid-handshake
    handshake: protocol.HandshakeResult | None = None
    error: protocol.ProtocolError | None = None


class BackendClient:
    """One worker at a time, started on demand.

    command: the worker's command line, e.g. paths.worker_command(python).
    pythonpath: folders for the worker's PYTHONPATH (none for the launcher, which sets up its own path).
    log_path: the worker's stderr goes here (rotated), and its last error lines into error messages.
    capabilities: what the worker must announce in its handshake.
    connect: opens a Connection to a new worker (default: spawn `command`); the seam for other transports.
    """

    start_timeout = 300.0  # seconds a starting worker gets for its imports and the handshake

    def __init__(
        self,
        command: Sequence[str],
        pythonpath: Sequence[str] = (),
        log_path: Path | None = None,
        *,
        capabilities: Sequence[str] = protocol.CAPABILITIES,
        connect: Callable[[], Connection] | None = None,
    ):
        self.command = list(command)
        self.pythonpath = list(pythonpath)
        self.log_path = log_path
        self.capabilities = tuple(capabilities)
        self.handshake: protocol.HandshakeResult | None = None
        self._log = LogFile(log_path) if log_path else None
        self._connect = connect or self._spawn
        self._rpc = Rpc()
        self._lock = threading.Lock()  # guards the fields below; held briefly, never across a wait
        self._session: Session | None = None
        self._starting: _Start | None = None
        self._queued: list[tuple[str, bytes]] = []  # (id, encoded request) waiting for the start
        self.remote: RemoteSettings | None = None
        self._files: RemoteFiles | None = None

    @classmethod
    def connect_remote(
        cls, settings: RemoteSettings, *, capabilities: Sequence[str] = protocol.CAPABILITIES, timeout: float = 10.0
    ) -> BackendClient:
        """A client of a remote worker (`python -m backend serve --listen`): inputs are uploaded, and result
        files are fetched into the request's output_dir, so callers cannot tell it from a local worker."""

        def connect() -> Connection:
            tls = dict(tls=settings.tls, cafile=settings.cafile or None)
            return TcpConnection(settings.address, settings.token, timeout=timeout, **tls)

        address = f"{'tls' if settings.tls else 'tcp'}://{settings.address}"
        client = cls([address], capabilities=capabilities, connect=connect)
        client.remote = settings
        client._files = RemoteFiles(client)
        client._rpc.hold = client._files.take
        return client

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        session = self._session
        return session is not None and session.usable

    @property
    def starting(self) -> bool:
        return self._starting is not None

    @property
    def pid(self) -> int | None:
        session = self._session
        return session.connection.pid if session is not None and session.usable else None

    def start(self, timeout: float | None = 300) -> protocol.HandshakeResult:
        """Start the worker unless it runs, and handshake (timeout: None or inf waits). Raises SDTexError on any
        failure."""
        return self._ready_session(check_timeout(timeout))[1]

    def shutdown(self, timeout: float = 3.0) -> None:
        """Ask the worker to exit, then terminate it, then kill it; open requests get an error.

        Never waits for a start in progress: a worker still importing is terminated at once.
        """
        with self._lock:
            session, self._session = self._session, None
            attempt, self._starting = self._starting, None
            queued, self._queued = self._queued, []
            self.handshake = None
        stopped = protocol.ProtocolError(BACKEND_STOPPED, "backend stopped: it was shut down")
        for request_id, _ in queued:
            self._rpc.answer(request_id, protocol.error(request_id, stopped))
        if attempt is not None and attempt.session is not None:
            attempt.session.close()  # not handshaken yet: nothing to ask politely
        if session is None:
            return
        deadline = time.monotonic() + timeout
        if session.usable:
            request_id = self._rpc.open()
            session.send(request_id, protocol.encode(protocol.request(request_id, protocol.SHUTDOWN)))
            try:
                self._rpc.wait(request_id, timeout=timeout)
            except SDTexError:
                pass  # no reply in time: terminate below
        session.close(grace=max(0.0, deadline - time.monotonic()))

    def _spawn(self) -> Connection:
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)  # Blender's own Python home would break another interpreter
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(self.pythonpath)
        else:
            env.pop("PYTHONPATH", None)
        env["PYTHONUNBUFFERED"] = "1"
        return StdioConnection(self.command, env, self._log)

    def _ready_session(self, timeout: float | None) -> tuple[Session, protocol.HandshakeResult]:
        with self._lock:
            session = self._usable_session()
            if session is not None:
                return session, self.handshake
            attempt = self._begin_start()
        if not attempt.done.wait(timeout):
            raise SDTexError(f"The backend did not start within {timeout:g} s")
        if attempt.error is not None:
            raise BackendError(attempt.error.code, attempt.error.message, attempt.error.data)
        return attempt.session, attempt.handshake

    def _usable_session(self) -> Session | None:
        session = self._session
        return session if session is not None and session.usable else None

    def _begin_start(self) -> _Start:
        """The start in progress, or a new one on its own thread (the caller holds `_lock`)."""
        if self._starting is None:
            self._starting, self.handshake = _Start(), None
            threading.Thread(target=self._run_start, args=(self._starting,), daemon=True, name="sdtex-start").start()
        return self._starting

    def _run_start(self, attempt: _Start) -> None:
        try:
            handshake = self._open_session(attempt)
        except protocol.ProtocolError as exc:
            self._start_failed(attempt, exc)
        except Exception as exc:  # noqa: BLE001 - a bug here must reach the waiters, not leave them hanging
            error = protocol.ProtocolError(BACKEND_START_FAILED, f"The backend did not start: {exc!r}")
            self._start_failed(attempt, error)
        else:
            with self._lock:
                if self._starting is attempt:
                    for request_id, data in self._queued:  # in order, before any later request
                        attempt.session.send(request_id, data)
                    self._session, self.handshake, self._starting, self._queued = attempt.session, handshake, None, []
                    attempt.handshake = handshake
                else:  # shut down meanwhile (and the session closed)
                    attempt.error = _stopped_while_starting()
        attempt.done.set()

    def _start_failed(self, attempt: _Start, error: protocol.ProtocolError) -> None:
        if attempt.session is not None:
            attempt.session.close()
        queued: list[tuple[str, bytes]] = []
        with self._lock:
            if self._starting is attempt:
                queued, self._queued, self._starting = self._queued, [], None
            else:  # shut down meanwhile: shutdown answered the queued requests
                error = _stopped_while_starting()
        attempt.error = error
        for request_id, _ in queued:
            self._rpc.answer(request_id, protocol.error(request_id, error))

    def _open_session(self, attempt: _Start) -> protocol.HandshakeResult:
        """Spawn a worker and handshake; ProtocolError with the message for the user on any failure."""
        try:
            connection = self._connect()
        except OSError as exc:
            what = "reach the remote backend at" if self.remote else "start the backend with"
            raise protocol.ProtocolError(BACKEND_START_FAILED, f"Cannot {what} {self.command[0]!r}: {exc}") from None
        session = Session(self._rpc, connection)
        with self._lock:
            attempt.session = session
            if self._starting is not attempt:
                raise _stopped_while_starting()
        request_id = self._rpc.open()
        params = {"protocol_version": protocol.PROTOCOL_VERSION, "capabilities": list(protocol.CAPABILITIES)}
        params.update(connection.handshake_params)
        session.send(request_id, protocol.encode(protocol.request(request_id, protocol.HANDSHAKE, params)))
        try:
            reply = Rpc.result(self._rpc.wait(request_id, timeout=self.start_timeout))
        except BackendError as exc:
            raise protocol.ProtocolError(exc.code, f"The backend did not start: {exc}", exc.data) from None
        except SDTexError as exc:  # no reply in time
            junk = "\nUnreadable output on stdout:\n" + "\n".join(session.junk) if session.junk else ""
            raise protocol.ProtocolError(BACKEND_START_FAILED, f"The backend did not start: {exc}{junk}") from None
        try:
            protocol.check_protocol_version(reply.get("protocol_version"))
        except protocol.ProtocolError as exc:
            raise protocol.ProtocolError(exc.code, f"Backend {exc.message}", exc.data) from None
        missing = protocol.missing_capabilities(reply.get("capabilities"), self.capabilities)
        if missing:
            raise protocol.ProtocolError(
                protocol.PROTOCOL_MISMATCH,
                f"Backend lacks {', '.join(missing)}; update the add-on and the backend together",
                {"missing": missing},
            )
        try:
            return protocol.HandshakeResult.from_dict(reply)
        except TypeError as exc:  # a required field is missing
            raise protocol.ProtocolError(
                BACKEND_START_FAILED, f"The backend did not start: malformed handshake reply ({exc})"
            ) from None

    # --- requests -------------------------------------------------------------------------------

    def submit(self, method: str, params: dict | None = None) -> str:
        """Send a request (starting the worker when needed, without waiting for it); return its id.

        A start failure arrives as the request's terminal error reply (code backend_start_failed, or
        protocol_mismatch).
        """
        request_id = self._rpc.open()
        try:
            if self._files is not None and method == protocol.RUN and isinstance(params, dict):
                params = self._files.prepare(request_id, params)  # blocks while input files are uploaded
            data = protocol.encode(protocol.request(request_id, method, params))
        except ValueError as exc:  # NaN or text that is not UTF-8: a bug in the caller, worth a clear message
            self._rpc.forget(request_id)
            raise SDTexError(f"Cannot send {method!r}: {exc}") from None
        except SDTexError:
            self._rpc.forget(request_id)
            raise
        with self._lock:
            session = self._usable_session()
            if session is None:
                self._queued.append((request_id, data))
                self._begin_start()
            else:
                session.send(request_id, data)
        return request_id

    def messages(self, request_id: str) -> list[dict]:
        """Messages received for one request since the last call (non-blocking, for Blender's timer)."""
        return self._rpc.messages(request_id)

    def wait(
        self, request_id: str, on_event: Callable[[dict], None] | None = None, timeout: float | None = None
    ) -> dict:
        """Block until the request's terminal reply, passing its events to on_event; return the reply.

        The timeout covers the worker's start too (None or inf: no timeout). On timeout the request is cancelled
        and forgotten, and SDTexError raised.
        """
        timeout = check_timeout(timeout)
        try:
            return self._rpc.wait(request_id, on_event, timeout)
        except RequestTimeout:
            self.cancel(request_id)
            raise SDTexError(f"The backend did not finish within {timeout:g} s; the request was cancelled") from None

    def forget(self, request_id: str) -> None:
        """Drop the request's mailbox and any later messages for it (a request not sent yet is not sent)."""
        with self._lock:
            self._queued = [item for item in self._queued if item[0] != request_id]
        self._rpc.forget(request_id)

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop a request; it answers with a `cancelled` terminal reply (at once when the
        request still waits for the worker to start)."""
        with self._lock:
            waiting = [item for item in self._queued if item[0] == request_id]
            if waiting:
                self._queued.remove(waiting[0])
            elif self._session is not None and self._session.has(request_id):
                self._session.notify(protocol.encode(protocol.notification(protocol.CANCEL, {"id": request_id})))
        if waiting:
            self._rpc.answer(request_id, protocol.cancelled(request_id))

    def request(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        """submit + wait + result, for simple calls; the timeout covers the start too."""
        check_timeout(timeout)  # before anything is sent
        return self.result(self.wait(self.submit(method, params), timeout=timeout))

    result = staticmethod(Rpc.result)

    def pass_on(self, request_id: str, message: dict) -> None:
        """Deliver a message the remote file mover held back (with local paths now)."""
        self._rpc.pass_on(request_id, message)

    def upload(self, data: bytes, timeout: float | None = None) -> str:
        """Hand bytes to the worker (an input image, an array); return their sha256 to reference them by.

        Sent once per worker process: bytes it holds already are not sent again.
        """
        if len(data) > protocol.UPLOAD_MAX:
            raise SDTexError(f"The upload is {len(data)} bytes; at most {protocol.UPLOAD_MAX} are accepted")
        digest = hashlib.sha256(data).hexdigest()
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        session, _ = self._ready_session(timeout)
        if digest in session.uploaded:
            return digest
        request_id = self._rpc.open()
        params = {"data": base64.b64encode(data).decode("ascii")}
        session.send(request_id, protocol.encode(protocol.request(request_id, protocol.UPLOAD, params)))
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        reply = self.result(self.wait(request_id, timeout=left))
        if reply.get("sha256") != digest:
            raise SDTexError(f"The backend stored the upload as {reply.get('sha256')!r}, expected {digest}")
        session.uploaded.add(digest)
        return digest

    def fetch(self, path: str, timeout: float | None = None) -> bytes:
        """The bytes of an artifact the worker wrote, fetched in chunks."""
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: list[bytes] = []
        offset = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            params = {"path": path, "offset": offset, "length": protocol.FETCH_CHUNK}
            reply = self.request(protocol.FETCH, params, timeout=left)
            chunk = base64.b64decode(reply["data"])
            chunks.append(chunk)
            offset += len(chunk)
            if reply.get("eof"):
                break
            if not chunk:
                raise SDTexError(f"The backend sent no bytes of {path} at offset {offset} before its end")
        if offset != reply.get("size", offset):
            raise SDTexError(f"{path} changed while it was fetched: got {offset} bytes, then it had {reply['size']}")
        return b"".join(chunks)


def _stopped_while_starting() -> protocol.ProtocolError:
    return protocol.ProtocolError(BACKEND_STOPPED, "backend stopped: it was shut down while starting")
