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
- TLS with --certfile/--keyfile (stdlib ssl).
- Remote clients never name paths on this machine (Policy): outputs go to the server's folder and come back
  with `fetch`, inputs are uploaded, models are hub ids or lie inside --models-dir, pickle is refused.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import queue
import re
import secrets
import select
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blender_sd_addon import protocol
from blender_sd_addon.protocol import INVALID_PARAMS, PARSE_ERROR, ProtocolError
from blender_sd_addon.transport import turn_recv, turn_sendall

log = logging.getLogger("backend.server")

UNAUTHORIZED = "unauthorized"  # no handshake first, or a missing or wrong token
TOO_MANY = "too_many_requests"  # a connection's request or job limit, or the server's connection limit
TOKEN_FILE = "server-token"
POLL = 0.5  # seconds between a reader's checks for idleness and server stop
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
MODEL_PARAMS = ("model", "upscaler_model")  # a hub id, or a file or folder inside --models-dir


@dataclass(frozen=True)
class Limits:
    max_message: int = protocol.MAX_LINE  # bytes in one line; a longer one closes the connection
    max_connections: int = 8
    idle_timeout: float = 300.0  # seconds without a message while the connection has no unfinished job
    handshake_timeout: float = 10.0  # seconds to connect (TLS included) and send the handshake
    max_requests: int = 100_000  # per connection; then it is closed (the client reconnects)
    max_jobs: int = 64  # unfinished jobs per connection
    outbox_bytes: int = 2 * protocol.MAX_LINE  # replies a client has not read yet; more closes it
    write_timeout: float = 60.0  # seconds one write may block


# --- the token -----------------------------------------------------------------------------------------------


def config_dir() -> Path:
    """Where the token lives: $SDTEX_CONFIG_DIR, else the platform's user config folder + sd-textures."""
    if custom := os.environ.get("SDTEX_CONFIG_DIR"):
        return Path(custom)
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "sd-textures"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "sd-textures"


def load_or_create_token(folder: Path) -> tuple[str, bool]:
    """The server's token and whether it was just made. A token file others can read is refused."""
    path = folder / TOKEN_FILE
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
    else:
        token = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, True
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise SystemExit(f"{path} is readable by other users: chmod 600 it (or delete it for a new token)")
    if len(token) < 16:
        raise SystemExit(f"{path} holds no usable token (at least 16 characters): delete it for a new one")
    return token, False


def token_matches(expected: str, given: Any) -> bool:
    """Constant-time comparison (on bytes: compare_digest refuses non-ASCII str)."""
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def is_loopback(host: str) -> bool:
    """Every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


# --- what remote clients may ask for -------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Rewrites a remote client's job parameters so it never names a path on this machine."""

    output_dir: Path  # every file is written here and fetched by the client
    models_dirs: tuple[Path, ...] = ()  # local models must lie inside one of these

    def check(self, method: str, params: dict) -> dict:
        """The parameters to run, or ProtocolError(INVALID_PARAMS) naming the parameter that is refused."""
        params = dict(params)
        if method == protocol.RUN:
            if params.get("output_dir"):
                raise _refused(
                    "output_dir", "left out: a remote backend writes to its own folder; fetch the files", "a path"
                )
            params["output_dir"] = str(self.output_dir)
            if params.get("task") == "list_models" and not params.get("models_dir") and self.models_dirs:
                params["models_dir"] = str(self.models_dirs[0])  # "my models" means the server's
        for name, value in list(params.items()):
            params[name] = self._value(name, name, value)
        return params

    def _value(self, name: str, shown_name: str, value: Any) -> Any:
        if name == "allow_pickle" and value is not False:
            raise _refused(shown_name, "false: a remote backend never loads pickle checkpoints", value)
        if isinstance(value, dict):
            if "path" in value:
                upload = "an upload: send the bytes with `upload`, then use their sha256"
                raise _refused(f"{shown_name}.path", upload, "a path")
            return value
        if isinstance(value, list):
            return [
                {k: self._value(k, f"{shown_name}[{i}].{k}", v) for k, v in item.items()}
                if isinstance(item, dict)
                else item
                for i, item in enumerate(value)
            ]
        if not isinstance(value, str) or not value or name == "output_dir":
            return value
        if name in (*MODEL_PARAMS, "path"):
            return self.model(shown_name, value)
        if name == "models_dir":
            return self._inside(shown_name, value, "one of the server's models folders")
        if name.endswith("_dir") or ("prompt" not in name and _looks_like_path(value)):
            raise _refused(shown_name, "no path: a remote client cannot name files on the server", value)
        return value

    def model(self, name: str, value: str) -> str:
        """A hub id, or a model inside a models folder (absolute, or relative to one)."""
        if os.path.isabs(value) or _looks_like_path(value):
            return self._inside(name, value, "a hub id or a model inside the server's models folder")
        if _HUB_ID.match(value) and ".." not in value and not os.path.lexists(value):
            return value
        for folder in self.models_dirs:
            candidate = os.path.realpath(folder / value)
            if _within(candidate, folder) and os.path.exists(candidate):
                return candidate
        raise _refused(name, self._accepted("a hub id like owner/name, or the name of a model in"), value)

    def _inside(self, name: str, value: str, what: str) -> str:
        real = os.path.realpath(os.path.expanduser(value)) if os.path.isabs(value) else None
        if real and any(_within(real, folder) for folder in self.models_dirs):
            return real
        raise _refused(name, self._accepted(what + ":"), value)

    def _accepted(self, what: str) -> str:
        folders = ", ".join(str(folder) for folder in self.models_dirs) or "(none: the server has no --models-dir)"
        return f"{what} {folders}"


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "~", "\\", "./")) or bool(_DRIVE.match(value)) or ".." in re.split(r"[\\/]", value)


def _within(path: str, folder: Path) -> bool:
    root = os.path.realpath(folder)
    return os.path.commonpath([path, root]) == root


def _refused(name: str, accepted: str, value: Any) -> ProtocolError:
    return ProtocolError(
        INVALID_PARAMS,
        f"{name} is refused by the remote backend: it accepts {accepted}; got {protocol.shown(value)}",
        {"param": name, "accepted": accepted, "value": protocol.shown(value)},
    )


# --- connections ---------------------------------------------------------------------------------------------


class _Closed(Exception):
    """The connection ends (idle, too long a line, server stopping)."""


class Connection:
    """One client: a reader thread (this object's run), a writer thread, and its Peer in the worker."""

    def __init__(self, server: Server, sock: socket.socket, address: tuple):
        from backend.worker import Peer

        self.server = server
        self.sock = sock
        self.name = f"{address[0]}:{address[1]}"
        self.peer = Peer(self.emit, self.name)
        self.closed = threading.Event()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._outbox_bytes = 0
        self._lock = threading.Lock()
        self._io = threading.Lock()  # one socket operation at a time (TLS)
        self._last_message = time.monotonic()
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

    def _lines(self):
        """The client's lines; _Closed on a line longer than max_message, idleness or server stop."""
        limits = self.server.limits
        buffer = bytearray()
        searched = 0
        handshake_deadline = time.monotonic() + limits.handshake_timeout
        while True:
            newline = buffer.find(b"\n", searched)
            if newline >= 0:
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                searched = 0
                self._last_message = time.monotonic()
                if line.strip():
                    yield line
                continue
            searched = len(buffer)
            if len(buffer) > limits.max_message:
                too_long = f"message longer than {limits.max_message} bytes"
                self.finish(protocol.error(None, ProtocolError(PARSE_ERROR, too_long + ": closing the connection")))
                raise _Closed(too_long)
            # Checked whether bytes come or not: a client trickling a line byte by byte is idle all the same.
            if self.closed.is_set() or self.server.stopping.is_set():
                raise _Closed("closed")
            now = time.monotonic()
            if self.requests == 0 and now > handshake_deadline:
                raise _Closed("no handshake in time")
            if now - self._last_message > limits.idle_timeout and not self.server.worker.unfinished(self.peer):
                raise _Closed(f"idle for {limits.idle_timeout:g} s")
            pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
            if not pending and not select.select([self.sock], [], [], POLL)[0]:
                continue
            chunk = turn_recv(self.sock, self._io, min(1 << 20, limits.max_message + 1))
            if chunk is None:  # TLS records but no data yet
                continue
            if not chunk:
                return
            buffer += chunk

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

    def __post_init__(self) -> None:
        from backend.worker import Worker

        self.worker = Worker(lambda message: None)  # every reply goes to its connection's peer
        self.work: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.connections: set[Connection] = set()
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener = socket.create_server((self.host, self.port), family=family, backlog=32)
        self.port = self.listener.getsockname()[1]

    def serve(self) -> None:
        """Accept on a thread; run the jobs on this one until stop()."""
        from backend.worker import run_jobs

        threading.Thread(target=self._accept, daemon=True, name="accept").start()
        try:
            run_jobs(self.worker, self.work)
        finally:
            self.stop()
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

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, address = self.listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                full = len(self.connections) >= self.limits.max_connections
                if not full:
                    connection = Connection(self, sock, address)
                    self.connections.add(connection)
            if full:
                log.warning("%s:%s refused: %d connections already", *address[:2], self.limits.max_connections)
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
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections)
    parser.add_argument("--max-message", type=int, default=defaults.max_message, help="Bytes in one message.")
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout, help="Seconds.")
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests, help="Per connection.")


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
    )
    from backend.worker import quiet_libraries

    quiet_libraries()
    server = Server(host, port, token, policy, context, limits)
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

