"""Reading and writing a non-blocking TCP/TLS socket from several threads: the client and the server both do."""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading
import time

SEND_PIECE = 1 << 16  # bytes a TCP/TLS send writes before the reader gets a turn
READ_POLL = 0.2  # seconds a writer waits for room before trying again

# A TCP connection (TLS or not) is read by one thread and written by others. An SSL object must not be used by
# two threads at once (an SSL_read overlapping an SSL_write crashed the process), so on a non-blocking socket each
# read and each piece of a write runs under one lock, and waiting (select) happens outside it: a blocking read
# under the lock would hold it while only a session ticket arrived, and a blocked write would starve the reader.


def turn_recv(sock: socket.socket, lock: threading.Lock, size: int) -> bytes | None:
    """One read of a non-blocking socket under `lock`: the bytes (b"" at the end), or None when none are there."""
    with lock:
        try:
            return sock.recv(size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return None


def turn_sendall(sock: socket.socket, lock: threading.Lock, data: bytes, timeout: float | None = None) -> None:
    """Write all of `data` to a non-blocking socket, a piece at a time under `lock`; TimeoutError when the peer
    takes none of it for `timeout` seconds."""
    view = memoryview(data)
    deadline = None if timeout is None else time.monotonic() + timeout
    while view:
        with lock:
            try:  # after a "want write", TLS needs the same bytes again: the same slice is offered
                sent = sock.send(view[:SEND_PIECE])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                sent = 0
        if sent:
            view, deadline = view[sent:], None if timeout is None else time.monotonic() + timeout
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(errno.ETIMEDOUT, f"the peer took nothing for {timeout:g} s")
        select.select([], [sock], [], READ_POLL)
