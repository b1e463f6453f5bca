"""Transport: a line channel to one worker: a subprocess over stdio, or a remote worker over TCP (TLS).

Stdlib only, no bpy (Blender's Python has ssl and socket, nothing third-party). A Connection moves bytes
and describes how it ended; it knows nothing of requests (rpc.py) or of starting and restarting workers
(client.py).
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .contract import protocol
from .contract.sockets import turn_recv, turn_sendall

LOG_MAX_BYTES = 2 * 2**20  # backend.log is rotated to backend.log.1 at this size (one old file kept)
STDERR_LINE_MAX = 64 * 2**10  # a longer stderr "line" is split, so a runaway print cannot exhaust memory
KILL_WAIT = 2.0  # seconds between terminate and kill
READ_POLL = 0.2  # seconds the TCP reader waits for bytes before looking whether it was closed
_ERROR_LINE = re.compile(r"error|exception|fatal|killed|out of memory|abort|segmentation fault", re.IGNORECASE)
_WARNING_LINE = re.compile(r"warn", re.IGNORECASE)


class Connection(ABC):
    """A channel of JSON lines to one worker, read by one thread and written by any."""

    log_path: Path | None = None
    handshake_params: dict = {}  # added to the handshake (a remote worker's token)

    @abstractmethod
    def send(self, data: bytes) -> None:
        """Write one encoded message; OSError when the channel is gone."""

    @abstractmethod
    def lines(self) -> Iterator[bytes]:
        """The lines the worker writes, until it closes the channel (blocking; for one reader thread)."""

    @abstractmethod
    def close(self, grace: float = 0.0) -> None:
        """End the channel; give the worker `grace` seconds to leave on its own first (it was asked to)."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None:
        """The worker's process id when it runs on this machine."""
        return None

    @abstractmethod
    def stopped_reason(self) -> str:
        """How the worker ended, for messages: "exit code 3", "killed by SIGKILL (out of memory?)"."""

    def error_lines(self) -> list[str]:
        """The worker's last traceback or error lines, when the channel carries its log."""
        return []


class StdioConnection(Connection):
    """The worker as a child process: requests on its stdin, replies on its stdout, its log on stderr.

    stderr is drained by a thread into `log` whatever happens to the log (a full disk must never fill the
    pipe and block the worker); its last lines are kept for error messages.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, log: LogFile | None = None):
        self.command = list(command)
        self.log = log
        self.log_path = log.path if log else None
        self._write_lock = threading.Lock()
        self._stderr_tail: deque[str] = deque(maxlen=200)
        self._proc = subprocess.Popen(  # OSError when the interpreter is missing: the caller words it
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window on Windows
        )
        if log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} backend pid {self._proc.pid}: {self.command}\n")
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True, name="sdtex-stderr")
        self._stderr_thread.start()

    def send(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
            except ValueError:  # stdin already closed by close()
                raise BrokenPipeError(errno.EPIPE, "the backend's stdin is closed") from None

    def lines(self) -> Iterator[bytes]:
        stdout = self._proc.stdout
        try:
            while line := stdout.readline(protocol.MAX_LINE + 1):
                if len(line) > protocol.MAX_LINE and not line.endswith(b"\n"):
                    while (rest := stdout.readline(protocol.MAX_LINE)) and not rest.endswith(b"\n"):
                        pass  # drop the rest of an over-long line; its start fails to decode and is reported
                yield line
        except (OSError, ValueError):
            return
        finally:
            stdout.close()

    def close(self, grace: float = 0.0) -> None:
        """Close stdin (the worker's signal to leave), wait `grace` s, then terminate, then kill."""
        proc = self._proc
        if self._write_lock.acquire(timeout=0.2):  # a write stuck on a hung worker must not hold up the kill
            try:
                proc.stdin.close()
            except OSError:
                pass  # a broken pipe on the final flush: the worker is gone already
            finally:
                self._write_lock.release()
        for stop, wait in ((None, grace), (proc.terminate, KILL_WAIT), (proc.kill, None)):
            if stop:
                try:
                    stop()
                except OSError:
                    pass  # exited meanwhile
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def stopped_reason(self) -> str:
        return describe_exit(self._proc.poll())

    def error_lines(self) -> list[str]:
        self._stderr_thread.join(timeout=1.0)  # the last lines arrive as stderr ends
        return error_lines(list(self._stderr_tail))

    def _drain_stderr(self) -> None:
        stderr = self._proc.stderr
        try:
            while line := stderr.readline(STDERR_LINE_MAX):
                if self.log:
                    self.log.write(line)
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self._stderr_tail.append(text)
        except (OSError, ValueError):
            pass  # the pipe broke: nothing left to drain
        finally:
            stderr.close()


class TcpConnection(Connection):
    """A remote worker (`python -m backend serve --listen HOST:PORT`): JSON lines over TCP, TLS when `tls`.

    token: the server's token, sent in the handshake. cafile: the certificate to trust (a self-signed
    server's own certificate); None trusts the system's certificate authorities. The host name is checked.
    """

    def __init__(
        self, address: str, token: str = "", *, tls: bool = False, cafile: str | None = None, timeout: float = 10.0
    ):
        host, port = parse_address(address)
        self.address = f"{'tls' if tls else 'tcp'}://{address}"
        self.handshake_params = {"token": token} if token else {}
        self._write_lock = threading.Lock()
        self._closed = threading.Event()
        self._reading = False  # the reader closes the socket itself (see close)
        self._reason = "connection still open"
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if tls:
                sock = ssl.create_default_context(cafile=cafile or None).wrap_socket(sock, server_hostname=host)
            sock.setblocking(False)  # reads and writes take turns (turn_recv, turn_sendall)
        except (OSError, ssl.SSLError):
            sock.close()
            raise
        self._sock = sock

    def send(self, data: bytes) -> None:
        if self._closed.is_set():
            raise BrokenPipeError(errno.EPIPE, "the connection to the backend is closed")
        turn_sendall(self._sock, self._write_lock, data)

    def lines(self) -> Iterator[bytes]:
        with self._write_lock:
            if self._closed.is_set():
                return
            self._reading = True
        buffer = bytearray()
        searched = 0
        try:
            while True:
                newline = buffer.find(b"\n", searched)
                if newline >= 0:
                    yield bytes(buffer[: newline + 1])
                    del buffer[: newline + 1]
                    searched = 0
                    continue
                searched = len(buffer)
                if len(buffer) > protocol.MAX_LINE:
                    self._reason = f"the backend sent a line longer than {protocol.MAX_LINE} bytes"
                    return
                # Read first, wait only when the read found nothing: bytes the TLS layer has already taken off the
                # socket are invisible to select (and to pending() while their record is still undecrypted).
                chunk = turn_recv(self._sock, self._write_lock, 1 << 20)
                if chunk is None:  # nothing yet, or TLS records without data (a session ticket)
                    if self._closed.is_set():
                        return
                    select.select([self._sock], [], [], READ_POLL)
                    continue
                if not chunk:
                    if not self._closed.is_set():
                        self._reason = f"{self.address} closed the connection"
                    return
                buffer += chunk
        except OSError as exc:
            if not self._closed.is_set():
                self._reason = f"the connection to {self.address} broke: {exc}"
        finally:
            with self._write_lock:
                self._closed.set()
                self._sock.close()

    def close(self, grace: float = 0.0) -> None:
        """Shut the socket down; the reader closes it once its read returns. Closed under a read in progress,
        the descriptor's number could be reused by a new connection and TLS would write its alert there."""
        if not self._closed.is_set():
            self._reason = f"the connection to {self.address} was closed"
        try:
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # SSLSocket.shutdown would drop TLS first
        except OSError:
            pass  # not connected any more
        with self._write_lock:
            self._closed.set()
            if not self._reading:
                self._sock.close()

    @property
    def alive(self) -> bool:
        return not self._closed.is_set()

    def stopped_reason(self) -> str:
        return self._reason


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT; ValueError naming what is wrong."""
    host, _, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a remote backend's address is HOST:PORT (e.g. gpu-box.local:7860), got {address!r}")
    return host, int(port)


def describe_exit(code: int | None) -> str:
    """An exit status in words; a SIGKILL nobody asked for is most often the out-of-memory killer."""
    if code is None:
        return "still running"
    if code >= 0xC0000000:  # a Windows NTSTATUS crash code, e.g. 0xc0000005 (access violation)
        return f"exit code {code:#x}"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}" + (" (out of memory?)" if -code == getattr(signal, "SIGKILL", 9) else "")


def error_lines(tail: list[str], limit: int = 12) -> list[str]:
    """The lines worth quoting from a log tail: error-looking lines after the last traceback (a crash that
    came later, e.g. "Fatal Python error"), else that traceback, else the last error-looking lines.

    Warnings are skipped: a torchvision deprecation notice is not why the worker stopped.
    """
    starts = [i for i, line in enumerate(tail) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return _errors(tail)[-5:]
    start = end = starts[-1]
    while end + 1 < len(tail) and (end == start or tail[end][:1].isspace()):
        end += 1  # a traceback ends with its first unindented line after the header: the exception
    if later := _errors(tail[end + 1 :]):
        return later[-5:]
    lines = tail[start : end + 1]
    return lines if len(lines) <= limit else [lines[0], "  …", *lines[-(limit - 2) :]]


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if _ERROR_LINE.search(line) and not _WARNING_LINE.search(line)]


class LogFile:
    """The worker's log: appended, rotated at `max_bytes` (one old file kept), written best effort.

    A failed write (disk full, folder gone) loses that data but never raises: the writer is the stderr drain
    and must keep reading. Later writes retry and first note how many writes were lost.
    """

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._file: BinaryIO | None = None
        self._size = 0
        self._lost = 0
        self._lock = threading.Lock()  # several connections (an old one still draining) share the log

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        with self._lock:
            try:
                if self._file is None:
                    self._file = self._open()
                    self._size = self._file.seek(0, os.SEEK_END)
                if self._lost:
                    self._append(f"[{self._lost} log write(s) lost: the log could not be written]\n".encode())
                    self._lost = 0
                self._append(data)
            except OSError:
                self._lost += 1
                self._drop_file()

    def _append(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self.max_bytes:
            self._drop_file()
            try:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            except OSError:
                pass  # held open elsewhere (Windows): keep appending, try again after another max_bytes
            self._file = self._open()
            self._size = 0
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "ab")  # noqa: SIM115 - kept open across writes, closed by _drop_file

    def _drop_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the buffered bytes that failed are already counted as lost
            self._file = None
