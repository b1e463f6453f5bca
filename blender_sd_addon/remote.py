"""A remote backend looks local: what BackendClient does for a worker on another machine.

Stdlib only, no bpy. A remote worker never sees paths of this machine and names none of its own to us:
- before a `run` goes out, its `output_dir` is kept here (the server writes to its own folder) and every input
  given by path is uploaded and referenced by its sha256;
- each `artifact` event and the terminal result are held back until the files they name are fetched, checked
  against their sha256 and written into that `output_dir` (never overwriting), then delivered with the local
  paths. So jobs.py, api.py and the operators read the same files, in the same place, as with a local worker.

RemoteSettings is how a remote backend is chosen: api.configure_remote(), the SDTEX_REMOTE environment
variables, or the add-on preferences (blender/session.py reads them).
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .contract import protocol
from .rpc import SDTexError
from .transport import parse_address

FETCH_FAILED = "fetch_failed"  # synthetic error code: a result file could not be fetched or written here
ENV_ADDRESS, ENV_TOKEN = "SDTEX_REMOTE", "SDTEX_REMOTE_TOKEN"
ENV_TLS, ENV_CAFILE = "SDTEX_REMOTE_TLS", "SDTEX_REMOTE_CAFILE"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RemoteSettings:
    """Where a remote backend listens and how to reach it."""

    address: str  # HOST:PORT
    token: str = ""
    tls: bool = False
    cafile: str = ""  # the certificate to trust (a self-signed server's); empty: the system's authorities

    def __post_init__(self) -> None:
        try:
            parse_address(self.address)
        except ValueError as exc:
            raise SDTexError(str(exc)) from None
        if self.cafile and not os.path.isfile(self.cafile):
            raise SDTexError(f"The remote backend's certificate file does not exist: {self.cafile}")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> RemoteSettings | None:
        """SDTEX_REMOTE=HOST:PORT (+ SDTEX_REMOTE_TOKEN, SDTEX_REMOTE_TLS=1, SDTEX_REMOTE_CAFILE), else None."""
        env = os.environ if environ is None else environ
        if not env.get(ENV_ADDRESS):
            return None
        tls = env.get(ENV_TLS, "").lower() in ("1", "true", "yes")
        return cls(env[ENV_ADDRESS], env.get(ENV_TOKEN, ""), tls, env.get(ENV_CAFILE, ""))


class FileChannel(Protocol):
    """What RemoteFiles needs of its client (BackendClient): named here so this module needs no client import."""

    def upload(self, data: bytes, timeout: float | None = None) -> str: ...
    def fetch(self, path: str, timeout: float | None = None) -> bytes: ...
    def cancel(self, request_id: str) -> None: ...
    def pass_on(self, request_id: str, message: dict) -> None: ...


class RemoteFiles:
    """Moves a remote client's input files up and its result files down (see the module's docstring)."""

    def __init__(self, client: FileChannel):
        self.client = client
        self._lock = threading.Lock()
        self._inboxes: dict[str, queue.SimpleQueue] = {}

    def prepare(self, request_id: str, params: dict) -> dict:
        """The params to send for a `run`: inputs uploaded, output_dir kept here (blocks while uploading)."""
        params = dict(params)
        folder = params.pop("output_dir", "")
        for name, value in params.items():
            if isinstance(value, dict) and isinstance(value.get("path"), str):
                params[name] = self._upload(name, value)
        if folder:
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            with self._lock:
                self._inboxes[request_id] = inbox
            threading.Thread(
                target=self._localise, args=(request_id, Path(folder), inbox), daemon=True, name="sdtex-fetch"
            ).start()
        return params

    def take(self, request_id: str, message: dict) -> bool:
        """Hold back a message of a request whose files come here (called by Rpc.deliver, under its lock)."""
        inbox = self._inboxes.get(request_id)
        if inbox is None:
            return False
        if protocol.is_terminal(message):
            with self._lock:
                self._inboxes.pop(request_id, None)
        inbox.put(message)
        return True

    def _upload(self, name: str, reference: dict) -> dict:
        try:
            with open(reference["path"], "rb") as f:
                data = f.read(protocol.UPLOAD_MAX + 1)
        except OSError as exc:
            raise SDTexError(f"{name}: cannot read {reference['path']} to send it: {exc.strerror}") from None
        rest = {key: value for key, value in reference.items() if key != "path"}  # an array's dtype and shape
        return {"sha256": self.client.upload(data), **rest}

    def _localise(self, request_id: str, folder: Path, inbox: queue.SimpleQueue) -> None:
        local: dict[str, str] = {}  # server path -> path here
        failure: protocol.ProtocolError | None = None
        while True:
            message = inbox.get()
            terminal = protocol.is_terminal(message)
            try:
                if failure is None and message.get("event") == protocol.EVENT_ARTIFACT:
                    data = dict(message["data"])
                    data["path"] = self._fetch(data, folder, local)
                    message = {**message, "data": data}
                elif failure is None and "result" in message:
                    message = {**message, "result": self._localise_result(message["result"], folder, local)}
            except (SDTexError, OSError, KeyError, TypeError) as exc:
                failure = protocol.ProtocolError(
                    FETCH_FAILED, f"The remote backend's result could not be brought to {folder}: {exc}"
                )
                if not terminal:
                    self.client.cancel(request_id)
                    continue
            if terminal and failure is not None and "result" in message:
                message = protocol.error(request_id, failure)
            self.client.pass_on(request_id, message)
            if terminal:
                return

    def _localise_result(self, result: dict, folder: Path, local: dict[str, str]) -> dict:
        for artifact in result.get("artifacts", []):
            artifact["path"] = self._fetch(artifact, folder, local)
        for image in result.get("images", []):
            image["path"] = local.get(image.get("path"), image.get("path"))
            image["maps"] = {role: local.get(path, path) for role, path in image.get("maps", {}).items()}
        return result

    def _fetch(self, artifact: dict, folder: Path, local: dict[str, str]) -> str:
        """The artifact's bytes, checked, in a new file in `folder`; its path here."""
        path = artifact["path"]
        if path in local:
            return local[path]
        data = self.client.fetch(path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != artifact.get("sha256", digest) or len(data) != artifact.get("size", len(data)):
            raise SDTexError(f"{path} arrived damaged ({len(data)} bytes, sha256 {digest})")
        local[path] = str(write_new(folder, re.split(r"[\\/]", path)[-1], data))
        return local[path]


def write_new(folder: Path, name: str, data: bytes) -> Path:
    """Write `data` completely under a temporary name, then give it `name` (or `stem_N.ext` when taken):
    nothing is ever overwritten, and nothing half-written has a final name. `name` cannot leave `folder`."""
    stem, suffix = os.path.splitext(name)
    stem = _UNSAFE_NAME.sub("_", stem).strip("._") or "sdtex"
    suffix = _UNSAFE_NAME.sub("", suffix)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".sdtex-partial-{secrets.token_hex(8)}{suffix}"
    with open(temporary, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        for n in range(10_000):
            final = folder / f"{stem}{f'_{n}' if n else ''}{suffix}"
            try:
                os.link(temporary, final)
            except FileExistsError:
                continue
            except OSError:  # no hard links here (FAT): the name was free a moment ago
                if final.exists():
                    continue
                os.rename(temporary, final)
            return final
        raise FileExistsError(f"too many files named {stem}_N{suffix} in {folder}")
    finally:
        temporary.unlink(missing_ok=True)
