"""Inputs a job reads: images and typed arrays, by local path or by bytes uploaded once (named by sha256).

Everything is checked here, at the boundary, before any expensive work: the reference's shape (in
protocol.check_reference), that the bytes exist, their format, size and dimensions. Errors name the
parameter and say what is accepted.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from blender_sd_addon import safe_remove
from blender_sd_addon.protocol import (
    ARRAY_DTYPES,
    INPUT_PIXELS_MAX,
    INVALID_PARAMS,
    UPLOAD_MAX,
    ProtocolError,
    invalid,
)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "TGA")


class InputStore:
    """Uploaded bytes, one file per sha256 in a private folder that lives as long as the worker."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else safe_remove.make_dir("sdtex-uploads-")
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        """Store bytes (once) and return their sha256."""
        if len(data) > UPLOAD_MAX:
            raise invalid("data", f"at most {UPLOAD_MAX} bytes", f"{len(data)} bytes")
        digest = hashlib.sha256(data).hexdigest()
        final = self.folder / digest
        with self._lock:
            if not final.exists():
                temporary = self.folder / f".{digest}.tmp"
                temporary.write_bytes(data)
                os.replace(temporary, final)  # complete before it has its name
        return digest

    def path(self, ref: dict, name: str) -> Path:
        """The file behind a checked reference: an uploaded digest or an existing absolute path."""
        if "sha256" in ref:
            path = self.folder / ref["sha256"]
            if not path.is_file():
                raise ProtocolError(
                    INVALID_PARAMS,
                    f"{name}: no upload with sha256 {ref['sha256']}; send it with the upload method first",
                    {"param": name},
                )
            return path
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
        safe_remove.remove_quietly(self.folder, self.folder.parent)  # a folder the caller gave is theirs


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
