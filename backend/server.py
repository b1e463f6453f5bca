"""`python -m backend serve --listen HOST:PORT`: the worker's protocol over TCP, for clients on other machines.

The same JSON lines and messages as the stdio worker (docs/protocol.md), served by the same Worker: one
reader thread per connection checks and answers the cheap requests, and every connection's jobs share the
worker's one queue and main thread (one job on the GPU at a time). Each connection is a `Peer`: its own job
ids, its own replies, and its own writer thread with a bounded outbox, so a client that stops reading, sends
garbage or idles only loses its own connection.

Security:
- Loopback by default; another address needs the token (generated on first start, printed once, stored with
  user-only permissions in the config folder). The token is checked for loopback too unless --no-token.
- The first message must be `handshake` with `"token"`; anything else (or a wrong token, compared in constant
  time) is answered `unauthorized` and the connection closed, before any other work.
- Until then a connection may send one short line (Limits.handshake_line), has handshake_timeout seconds, and
  counts against its address's cap of unauthenticated connections (not against max_connections, which counts
  token holders): idle or flooding strangers cannot lock token holders out.
- TLS with --certfile/--keyfile (stdlib ssl).
- Clients are isolated: each fetches only its own jobs' files and uses only its own uploads (per-client and total
  quotas; deleted when it disconnects), and the handshake does not tell it what another client loaded.
- Remote clients never name paths on this machine (backend.remote_policy): outputs go to the server's folder
  and come back with `fetch`, inputs are uploaded, models are hub ids or lie inside --models-dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from backend.inputs import InputStore, UploadQuota, remove_stale
from backend.remote_policy import Policy
from backend.server_token import TOKEN_FILE, config_dir, is_loopback, load_or_create_token, token_matches
from sdtex_contract import protocol, safe_remove
from sdtex_contract.protocol import PARSE_ERROR, ProtocolError
from sdtex_contract.sockets import turn_recv, turn_sendall

log = logging.getLogger("backend.server")

UNAUTHORIZED = "unauthorized"  # no handshake first, or a missing or wrong token
TOO_MANY = "too_many_requests"  # a connection's request or job limit, or the server's connection limit
POLL = 0.5  # seconds between a reader's checks for idleness and server stop


@dataclass(frozen=True)
class Limits:
    max_message: int = protocol.MAX_LINE  # bytes in one line; a longer one closes the connection
    max_connections: int = 8  # clients that passed the handshake
    idle_timeout: float = 300.0  # seconds without a message nor an unfinished job
    handshake_timeout: float = 5.0  # seconds to connect (TLS included) and send the handshake
    handshake_line: int = 64 * 2**10  # bytes in a line before the handshake passed
    max_unauthenticated: int = 16  # connections of one address that have not passed the handshake yet
    max_unauthenticated_total: int = 256  # the same, all addresses together
    max_requests: int = 100_000  # per connection; then it is closed (the client reconnects)
    max_jobs: int = 64  # unfinished jobs per connection
    outbox_bytes: int = 2 * protocol.MAX_LINE  # replies a client has not read yet; more closes it
    write_timeout: float = 60.0  # seconds one write may block


# --- connections ---------------------------------------------------------------------------------------------


class _Closed(Exception):
    """The connection ends (idle, too long a line, server stopping)."""


class Connection:
    """One client: a reader thread (this object's run), a writer thread, and its Peer in the worker."""

    def __init__(self, server: Server, sock: socket.socket, address: tuple):
        from backend.worker import Peer

        self.server = server
        self.sock = sock
        self.host = address[0]
        self.name = f"{address[0]}:{address[1]}"
        self.peer = Peer(self.emit, self.name, remote=True)
        self.authenticated = False
        self.closed = threading.Event()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._outbox_bytes = 0
        self._lock = threading.Lock()
        self._io = threading.Lock()  # one socket operation at a time (TLS)
        self._last_active = time.monotonic()
        self._deadline = self._last_active + server.limits.handshake_timeout  # for the handshake, TLS included
        self.requests = 0

    # --- writing: never blocks the caller (the worker's main thread emits job events) ------------------

    def emit(self, message: dict) -> None:
        try:
            data = protocol.encode(message)
        except (ValueError, TypeError) as exc:  # NaN or unencodable text in a reply: still answer the request
            if not protocol.is_terminal(message):
                return
            from backend.worker import _internal

            data = protocol.encode(protocol.error(message.get("id"), _internal(exc)))
        with self._lock:
            if self.closed.is_set():
                return
            self._outbox_bytes += len(data)
            if self._outbox_bytes > self.server.limits.outbox_bytes:
                log.warning("%s: does not read its replies (%d bytes waiting): closing", self.name, self._outbox_bytes)
                full = True
            else:
                full = False
                self._outbox.put(data)
        if full:
            self.close()

    def _write(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                turn_sendall(self.sock, self._io, data, self.server.limits.write_timeout)
            except OSError:  # gone, or blocked past write_timeout
                self.close()
                return
            with self._lock:
                self._outbox_bytes -= len(data)

    def close(self) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            self._outbox.put(None)
        self.server.worker.cancel_all(self.peer)  # nobody will read what its jobs make
        if self.peer.inputs is not None:
            self.peer.inputs.close()  # its uploads: nobody else may use them
        try:
            # socket.socket.shutdown: SSLSocket.shutdown drops the TLS layer first, and a later write goes out plain
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more
        self.server.forget(self)

    def finish(self, message: dict) -> None:
        """Send a last message, then close once it is written (or the write timed out)."""
        self.emit(message)
        with self._lock:
            self._outbox.put(None)
        self._writer.join(self.server.limits.write_timeout)
        self.close()

    # --- reading -------------------------------------------------------------------------------------------

    def run(self) -> None:
        limits = self.server.limits
        try:
            self.sock.settimeout(limits.handshake_timeout)
            if self.server.ssl_context is not None:
                self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
            self.sock.setblocking(False)  # reads and writes take turns (transport.turn_recv, turn_sendall)
            self._writer = threading.Thread(target=self._write, daemon=True, name=f"write {self.name}")
            self._writer.start()
            lines = self._lines()
            if not self._authenticate(next(lines, None)):
                return
            for line in lines:
                self._receive(line)
        except _Closed as exc:
            log.info("%s: %s", self.name, exc)
        except (OSError, ssl.SSLError) as exc:
            log.info("%s: %s", self.name, exc)
        finally:
            self.close()
            if hasattr(self, "_writer"):  # closed under a write, the number could go to a new connection
                self._writer.join(limits.write_timeout)
            self.sock.close()

    def _lines(self) -> Iterator[bytes]:
        """The client's lines; _Closed on a line over the limit (handshake_line until the handshake passed,
        then max_message; answered `parse_error`), idleness or server stop."""
        buffer = bytearray()
        searched = 0
        while True:
            newline = buffer.find(b"\n", searched)
            limit = self.server.limits.max_message if self.authenticated else self.server.limits.handshake_line
            if newline > limit or (newline < 0 and len(buffer) > limit):
                too_long = f"message longer than {limit} bytes"
                self.finish(protocol.error(None, ProtocolError(PARSE_ERROR, too_long + ": closing the connection")))
                raise _Closed(too_long)
            if newline >= 0:
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                searched = 0
                self._last_active = time.monotonic()
                if line.strip():
                    yield line
                continue
            searched = len(buffer)
            self._check_open()
            # Read first, wait only when the read found nothing: bytes the TLS layer has already taken off the
            # socket are invisible to select (and to pending() while their record is still undecrypted).
            chunk = turn_recv(self.sock, self._io, min(1 << 20, limit + 1))
            if chunk is None:
                select.select([self.sock], [], [], POLL)
                continue
            if not chunk:
                return
            buffer += chunk

    def _check_open(self) -> None:
        """_Closed when the connection must end: closed, server stopping, no handshake in time, or idle.
        Checked whether bytes come or not: a client trickling a line byte by byte is idle all the same."""
        limits = self.server.limits
        if self.closed.is_set() or self.server.stopping.is_set():
            raise _Closed("closed")
        now = time.monotonic()
        if not self.authenticated and now > self._deadline:
            raise _Closed("no handshake in time")
        if self.server.worker.unfinished(self.peer):
            self._last_active = now  # idle counts from its last job's end: it has the files to fetch then
        elif now - self._last_active > limits.idle_timeout:
            raise _Closed(f"idle for {limits.idle_timeout:g} s")

    def _authenticate(self, line: bytes | None) -> bool:
        """The first message must be a handshake with the token; else `unauthorized` and the end."""
        if line is None:
            return False
        try:
            message = protocol.decode(line)
        except ProtocolError:
            message = {}
        request_id = protocol.request_id_of(message)
        params = message.get("params")
        token = params.get("token") if isinstance(params, dict) else None
        if message.get("method") != protocol.HANDSHAKE:
            why = "the first message must be a handshake with the server's token"
        elif self.server.token is not None and not token_matches(self.server.token, token):
            why = "wrong token" if token else "the handshake lacks the server's token"
        elif not self.server.admit(self):
            full = f"the server already serves {self.server.limits.max_connections} clients: try again later"
            self.finish(protocol.error(request_id, ProtocolError(TOO_MANY, full)))
            return False
        else:
            self.requests = 1
            self.server.worker.receive(message, self.peer)
            return True
        log.warning("%s: refused: %s", self.name, why)
        self.finish(protocol.error(request_id, ProtocolError(UNAUTHORIZED, f"unauthorized: {why}")))
        return False

    def _receive(self, line: bytes) -> None:
        limits, worker = self.server.limits, self.server.worker
        self.requests += 1
        try:
            message = protocol.decode(line)
        except ProtocolError as exc:
            self.emit(protocol.error(None, exc))
            return
        request_id, method = protocol.request_id_of(message), message.get("method")
        params = message.get("params", {})
        try:
            if self.requests > limits.max_requests:
                self.finish(protocol.error(request_id, ProtocolError(TOO_MANY, "too many requests: reconnect")))
                return
            if method == protocol.SHUTDOWN and request_id is not None:  # ends this connection, not the server
                self.finish(protocol.result(request_id, {}))
                return
            if method in (protocol.RUN, protocol.LOAD_MODEL) and isinstance(params, dict) and request_id is not None:
                if worker.unfinished(self.peer) >= limits.max_jobs:
                    raise ProtocolError(TOO_MANY, f"at most {limits.max_jobs} unfinished jobs per connection")
                message = {**message, "params": self.server.policy.check(method, params)}
        except ProtocolError as exc:
            self.emit(protocol.error(request_id, exc))
            return
        if (work := worker.receive(message, self.peer)) is not None:
            self.server.work.put(work)


# --- the server ----------------------------------------------------------------------------------------------


@dataclass
class Server:
    host: str
    port: int
    token: str | None
    policy: Policy
    ssl_context: ssl.SSLContext | None = None
    limits: Limits = field(default_factory=Limits)
    quota: UploadQuota = field(default_factory=UploadQuota)

    def __post_init__(self) -> None:
        from backend.worker import Worker

        self.worker = Worker(lambda message: None, InputStore(quota=self.quota))  # replies go to each peer
        self.work: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.connections: set[Connection] = set()  # authenticated
        self.strangers: list[Connection] = []  # not authenticated yet
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener = socket.create_server((self.host, self.port), family=family, backlog=32)
        self.port = self.listener.getsockname()[1]

    def serve(self) -> None:
        """Accept on a thread; run the jobs on this one until stop()."""
        from backend.worker import run_jobs

        # A hub id is tried as a path relative to the working folder first: let it find nothing there.
        previous = os.getcwd()
        os.chdir(safe_remove.claim(self.worker.inputs.folder / "cwd"))
        threading.Thread(target=self._accept, daemon=True, name="accept").start()
        try:
            run_jobs(self.worker, self.work)
        finally:
            self.stop()
            os.chdir(previous)
            self.worker.inputs.close()

    def stop(self) -> None:
        self.stopping.set()
        self.worker.cancel_all()
        self.work.put(None)
        try:
            self.listener.close()
        except OSError:
            pass

    def forget(self, connection: Connection) -> None:
        with self._lock:
            self.connections.discard(connection)
            if connection in self.strangers:
                self.strangers.remove(connection)

    def admit(self, connection: Connection) -> bool:
        """A stranger passed the handshake: it becomes a client, with its own uploads, if there is room."""
        with self._lock:
            if connection in self.strangers:
                self.strangers.remove(connection)
            if len(self.connections) >= self.limits.max_connections:
                return False
            self.connections.add(connection)
        connection.peer.inputs = self.worker.inputs.for_client(connection.name)
        connection.authenticated = True
        return True

    def _accept(self) -> None:
        limits = self.limits
        while not self.stopping.is_set():
            try:
                sock, address = self.listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                same = sum(stranger.host == address[0] for stranger in self.strangers)
                full = same >= limits.max_unauthenticated or len(self.strangers) >= limits.max_unauthenticated_total
                if not full:
                    connection = Connection(self, sock, address)
                    self.strangers.append(connection)
            if full:
                log.warning("%s:%s refused: %d connections without a handshake already", *address[:2], same)
                sock.close()
                continue
            threading.Thread(target=connection.run, daemon=True, name=f"read {connection.name}").start()


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or :PORT (loopback)."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"--listen takes HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`serve`'s TCP options (without --listen it serves stdio, as the add-on starts it)."""
    defaults = Limits()
    parser.add_argument("--listen", type=parse_listen, metavar="HOST:PORT", help="Serve TCP clients here.")
    parser.add_argument("--certfile", type=Path, help="TLS certificate (PEM); with --keyfile, clients must use TLS.")
    parser.add_argument("--keyfile", type=Path, help="TLS private key (PEM).")
    parser.add_argument(
        "--models-dir", type=Path, action="append", default=[], help="Folder remote clients may load models from."
    )
    parser.add_argument("--output-dir", type=Path, help="Where remote jobs write (default: <config dir>/outputs).")
    parser.add_argument("--config-dir", type=Path, help=f"Token folder (default: {config_dir()}).")
    parser.add_argument("--no-token", action="store_true", help="Accept clients without the token (loopback only).")
    parser.add_argument(
        "--max-connections", type=int, default=defaults.max_connections, help="Clients that passed the handshake."
    )
    parser.add_argument("--max-message", type=int, default=defaults.max_message, help="Bytes in one message.")
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout, help="Seconds.")
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests, help="Per connection.")
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=defaults.handshake_timeout,
        help="Seconds to connect and hand over the token (TLS included).",
    )
    parser.add_argument(
        "--max-unauthenticated", type=int, default=defaults.max_unauthenticated,
        help="Connections one address may have open before their handshake.",
    )  # fmt: skip
    quota = UploadQuota()
    parser.add_argument("--upload-quota", type=int, default=quota.per_client, help="Upload bytes kept per client.")
    parser.add_argument("--upload-total", type=int, default=quota.total, help="Upload bytes kept for all clients.")
    parser.add_argument("--upload-expiry", type=float, default=quota.expiry, help="Seconds an unused upload is kept.")


def serve_tcp(args: argparse.Namespace) -> int:
    host, port = args.listen
    loopback = is_loopback(host)
    if args.no_token and not loopback:
        print(f"error: --no-token is only for loopback addresses; {host} is not one", file=sys.stderr)
        return 2
    if bool(args.certfile) != bool(args.keyfile):
        print("error: TLS needs both --certfile and --keyfile", file=sys.stderr)
        return 2
    folder = args.config_dir or config_dir()
    token = None
    if not args.no_token:
        token, created = load_or_create_token(folder)
        if created:
            print(f"sdtex-server token (stored in {folder / TOKEN_FILE}): {token}", flush=True)
    context = None
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(args.certfile, args.keyfile)
    output_dir = (args.output_dir or folder / "outputs").resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    policy = Policy(output_dir, tuple(path.resolve() for path in args.models_dir))
    limits = Limits(
        max_message=args.max_message,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        max_requests=args.max_requests,
        handshake_timeout=args.handshake_timeout,
        max_unauthenticated=args.max_unauthenticated,
    )
    quota = UploadQuota(args.upload_quota, args.upload_total, args.upload_expiry)
    from backend.worker import quiet_libraries

    quiet_libraries()
    if removed := remove_stale():
        log.info("removed %d uploads folder(s) that killed workers left behind", len(removed))
    server = Server(host, port, token, policy, context, limits, quota)
    scheme = "tls" if context else "tcp"
    # The address line is for people and scripts (a test binds port 0 and reads the port from it).
    print(f"sdtex-server listening on {scheme}://{host}:{server.port}", flush=True)
    if not loopback:
        log.warning("listening on %s, reachable from other machines: clients need the token", host)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    return 0
