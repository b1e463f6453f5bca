"""Inputs a job reads: images and typed arrays, by local path or by bytes uploaded once (named by sha256).

Everything is checked here, at the boundary, before any expensive work: the reference's shape (in
protocol.check_reference), that the bytes exist, their format, size and dimensions. Errors name the
parameter and say what is accepted.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from sdtex_contract import safe_remove
from sdtex_contract.protocol import (
    ARRAY_DTYPES,
    INPUT_PIXELS_MAX,
    INVALID_PARAMS,
    UPLOAD_MAX,
    ProtocolError,
    invalid,
)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "TGA")
UPLOADS_PREFIX = "sdtex-uploads-"  # the temp folder's uploads folders are ours by this prefix and the marker
PID_FILE = "owner.pid"  # the process using the folder: once it is gone (killed), the next start removes it


@dataclass(frozen=True)
class UploadQuota:
    """Bytes that stay stored: per client (connection) and in total; unused uploads expire."""

    per_client: int = 1 << 30
    total: int = 4 << 30
    expiry: float = 3600.0  # seconds since an upload was last stored or used


class _Shared:
    """What a store and its clients' stores share: the lock, the quota and the bytes stored in all of them."""

    def __init__(self, quota: UploadQuota | None):
        self.lock = threading.Lock()
        self.quota = quota
        self.total = 0


class InputStore:
    """Uploaded bytes, one file per sha256 in a private folder that lives as long as the worker.

    With a quota (the TCP server), each client stores into its own store (`for_client`): it sees only its own
    uploads, within its share, and they are deleted when it goes (`close`) or expire unused.
    """

    def __init__(self, folder: Path | None = None, quota: UploadQuota | None = None, *, _shared: _Shared | None = None):
        if folder is None:
            folder = safe_remove.make_dir(UPLOADS_PREFIX)
            (folder / PID_FILE).write_text(str(os.getpid()))
        self.folder = Path(folder)
        self._shared = _shared or _Shared(quota)
        self._lock = self._shared.lock
        self._files: dict[str, tuple[int, float]] = {}  # sha256: (size, last stored or used)

    def for_client(self, name: str) -> InputStore:
        """A client's own store in a new folder inside this one, sharing its quota."""
        folder = safe_remove.make_dir(f"client-{secrets.token_hex(4)}-", self.folder)
        return InputStore(folder, _shared=self._shared)

    def put(self, data: bytes) -> str:
        """Store bytes (once) and return their sha256."""
        if len(data) > UPLOAD_MAX:
            raise invalid("data", f"at most {UPLOAD_MAX} bytes", f"{len(data)} bytes")
        digest = hashlib.sha256(data).hexdigest()
        final = self.folder / digest
        with self._lock:
            self._expire()
            if digest not in self._files:
                self._check_quota(len(data))
                temporary = self.folder / f".{digest}.tmp"
                temporary.write_bytes(data)
                os.replace(temporary, final)  # complete before it has its name
                self._shared.total += len(data)
            self._files[digest] = (len(data), time.monotonic())
        return digest

    def _check_quota(self, size: int) -> None:
        quota = self._shared.quota
        if quota is None:
            return
        mine = sum(stored for stored, _ in self._files.values())
        for what, used, limit in (("per client", mine, quota.per_client), ("in all", self._shared.total, quota.total)):
            if used + size > limit:
                raise ProtocolError(
                    INVALID_PARAMS,
                    f"upload quota exceeded: this upload is {size} bytes, {used} of the {limit} bytes allowed {what} "
                    f"are in use (uploads are deleted when the connection closes or after {quota.expiry:g} s unused)",
                    {"param": "data", "quota": limit, "used": used, "size": size},
                )

    def _expire(self) -> None:
        quota = self._shared.quota
        if quota is None:
            return
        old = [d for d, (_, used) in self._files.items() if time.monotonic() - used > quota.expiry]
        for digest in old:
            self._forget(digest)

    def _forget(self, digest: str) -> None:
        size, _ = self._files.pop(digest)
        (self.folder / digest).unlink(missing_ok=True)
        self._shared.total -= size

    def path(self, ref: dict, name: str) -> Path:
        """The file behind a checked reference: an uploaded digest or an existing absolute path."""
        if "sha256" in ref:
            digest = ref["sha256"]
            with self._lock:
                stored = self._files.get(digest)
                if stored:
                    self._files[digest] = (stored[0], time.monotonic())  # in use: it does not expire yet
            if not stored:
                raise ProtocolError(
                    INVALID_PARAMS,
                    f"{name}: no upload with sha256 {ref['sha256']}; send it with the upload method first",
                    {"param": name},
                )
            return self.folder / digest
        path = Path(ref["path"])
        if not path.is_absolute():
            raise invalid(name, "an absolute path", ref["path"])
        try:
            if path.is_file():
                return path
        except OSError:  # e.g. a component longer than the file system allows
            pass
        raise ProtocolError(INVALID_PARAMS, f"{name}: no such file: {ref['path']}", {"param": name})

    def close(self) -> None:
        with self._lock:
            for digest in list(self._files):
                self._forget(digest)
        safe_remove.remove_quietly(self.folder, self.folder.parent)  # a folder the caller gave is theirs


def remove_stale(parent: str | Path | None = None) -> list[Path]:
    """Delete the uploads folders that earlier workers left in the temp folder (killed before their clean-up):
    only ours (prefix and marker) whose owner process is gone. POSIX only (Windows has no cheap liveness test)."""
    removed = []
    root = Path(parent or tempfile.gettempdir())
    for folder in root.glob(f"{UPLOADS_PREFIX}*") if os.name == "posix" else ():
        try:
            pid = int((folder / PID_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one that says who uses it: leave it
        if not _alive(pid) and safe_remove.remove_quietly(folder, root):
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def open_image(store: InputStore, ref: dict, name: str) -> PIL.Image.Image:
    """Decode an input image (EXIF orientation applied), refusing unknown formats and oversized pictures
    before their pixels are decoded."""
    path = store.path(ref, name)
    accepted = f"an image file ({', '.join(IMAGE_FORMATS)}) of at most {INPUT_PIXELS_MAX} pixels"
    try:
        with PIL.Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                raise invalid(name, accepted, f"a {image.format} file")
            width, height = image.size
            if width < 1 or height < 1 or width * height > INPUT_PIXELS_MAX:
                raise invalid(name, accepted, f"{width}x{height} pixels")
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise invalid(name, accepted, f"{path.name} ({type(exc).__name__}: {exc})") from None


def open_array(store: InputStore, ref: dict, name: str) -> np.ndarray:
    """A typed array from raw little-endian C-order bytes; the byte count must match dtype and shape."""
    path = store.path(ref, name)
    dtype, shape = ref["dtype"], tuple(ref["shape"])
    expected = math.prod(shape) * ARRAY_DTYPES[dtype]
    size = path.stat().st_size
    if size != expected:
        raise invalid(name, f"{expected} bytes for {dtype} {list(shape)}", f"{size} bytes")
    array = np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise invalid(name, "finite values (no NaN or infinity)", "non-finite values")
    return array.astype(array.dtype.newbyteorder("="))
