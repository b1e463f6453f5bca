"""Parameters: the kinds, ranges and choices every request is checked against, on both sides.

A Param is one entry of a task's table (tables.py); the worker validates requests with it, the add-on builds
its properties and checks from it, the CLI its flags, the handshake its task specs.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import invalid

SCHEDULERS = (
    "ddpm",
    "ddim",
    "pndm",
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
    "lcm",
    "tcd",
    "ddim_trailing",  # trailing timesteps: few-step models (Hyper-SD, Turbo) start from pure noise
    "euler_a_trailing",
)
SEAMLESS_AXES = ("none", "x", "y", "xy")
SPEEDS = ("off", "fast", "faster")  # cached U-Net steps (backend/deepcache.py)
PROJECT_MODES = ("sequential", "synchronized")  # views in turn, or denoised together (backend/view_sync.py)
SEAMLESS_INPUT_AXES = (*SEAMLESS_AXES, "auto")  # tasks with an input image: "auto" = the axes it already tiles on
RESIZE_MODES = ("fit", "fill", "stretch", "keep")
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp16", "bf16", "fp32")
NORMAL_FORMATS = ("opengl", "directx")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "OPENEXR")
ARRAY_DTYPES = {"float32": 4, "float16": 2, "uint8": 1, "uint16": 2, "int32": 4}  # little-endian, C order

SEED_MAX = 2**32 - 1
SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 64, 2048, 8
TEXT_MAX = 4000  # characters in a prompt or any other string parameter (CLIP reads 77 tokens anyway)
PATH_MAX = 4096
UPLOAD_MAX = 48 * 2**20  # bytes in one uploaded file
MAX_LINE = UPLOAD_MAX * 4 // 3 + 2**20  # bytes in one message: the largest upload, base64-encoded, and its JSON
FETCH_CHUNK = 8 * 2**20  # bytes per fetch reply
LORAS_MAX = 8  # LoRAs in one request
INPUT_PIXELS_MAX = 8192 * 8192  # an input image larger than this is refused before decoding
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # a Hugging Face repository id: owner/name
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # loaded only with allow_pickle
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def is_hub_id(value: str) -> bool:
    """owner/name, and not a checkpoint's file name (a missing `models/x.safetensors` is a missing file)."""
    return bool(HUB_ID.match(value)) and not value.lower().endswith(CHECKPOINT_SUFFIXES)


# --- inputs: images and arrays by path or by uploaded bytes ----------------------------------------


class ImageInput(dict):
    """Kind marker for an image parameter: {"path": "/abs/file.png"} or {"sha256": "<hex of uploaded bytes>"}."""


class ArrayInput(dict):
    """Kind marker for a typed array: {"path" | "sha256": ..., "dtype": "float32", "shape": [h, w, ...]}.
    The bytes are the raw little-endian C-order array (numpy's `tobytes()`)."""


def check_reference(name: str, value: Any, array: bool) -> dict:
    """Shape-check an input reference (the worker checks the bytes behind it)."""
    kind = "an array reference" if array else "an image reference"
    accepted = f'{kind}: {{"path": absolute path}} or {{"sha256": hex of uploaded bytes}}'
    if array:
        accepted = accepted[:-1] + f', "dtype": one of {", ".join(ARRAY_DTYPES)}, "shape": [sizes]}}'
    if not isinstance(value, dict) or ("path" in value) == ("sha256" in value):
        raise invalid(name, accepted, value)
    if "path" in value:
        path = value["path"]
        if not isinstance(path, str) or not path.strip() or not valid_text(path, PATH_MAX) or "\x00" in path:
            raise invalid(name + ".path", "an absolute path", path)
        out = {"path": path}
    else:
        digest = value["sha256"]
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise invalid(name + ".sha256", "64 lowercase hex digits (the upload's sha256)", digest)
        out = {"sha256": digest}
    if array:
        dtype, shape = value.get("dtype"), value.get("shape")
        if dtype not in ARRAY_DTYPES:
            raise invalid(name + ".dtype", "one of " + ", ".join(ARRAY_DTYPES), dtype)
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= 4
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 65536 for s in shape)
        ):
            raise invalid(name + ".shape", "a list of 1 to 4 sizes from 1 to 65536", shape)
        out.update(dtype=dtype, shape=list(shape))
    return out


def valid_text(value: str, limit: int) -> bool:
    """Encodable as UTF-8 (no lone surrogates) and at most `limit` characters."""
    if len(value) > limit:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- parameters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Inclusive numeric range, optionally restricted to multiples."""

    low: float
    high: float
    multiple: int = 0

    def describe(self, kind: type) -> str:
        if kind is int:
            text = f"an integer from {int(self.low)} to {int(self.high)}"
        else:
            text = f"a number from {self.low:g} to {self.high:g}"
        return text + (f" in multiples of {self.multiple}" if self.multiple else "")


# Path-like parameters (Param.path). One policy covers every one of them on a remote backend (backend/server.py).
READS = "reads"  # a file or folder the task reads: a checkpoint, photos
READS_OR_HUB = "reads_or_hub"  # the same, or a hub id owner/name: models, LoRAs, ControlNets
WRITES = "writes"  # a folder the task writes into: outputs, downloads, caches

KIND_NAMES = {
    str: "string", int: "integer", float: "number", bool: "boolean", ImageInput: "image", ArrayInput: "array",
    list: "list",
}  # fmt: skip


@dataclass(frozen=True)
class Param:
    """One request parameter: its type, default, accepted values and help text.

    These tables drive validation in the worker and the add-on, the CLI flags, the panel's limits and
    the handshake's task specs, so a range is written down exactly once.
    """

    name: str
    kind: type
    default: Any
    help: str
    range: Range | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is accepted (meaning "pick for me", e.g. a random seed)
    required: bool = False  # a string that must not be empty, or an input that must be given
    max_length: int = TEXT_MAX
    path: str = ""  # a path-like string: READS, READS_OR_HUB or WRITES (how a remote backend polices it)
    # kind list: a list of at most max_items objects, each checked against this table (LoRAs, keyframes).
    items: tuple[Param, ...] = ()
    max_items: int = 0

    def accepted(self) -> str:
        if self.kind is list:
            fields = ", ".join(p.name for p in self.items)
            return f"a list of at most {self.max_items} objects with {fields}"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.range:
            return self.range.describe(self.kind)
        if self.kind is str:
            return "a non-empty string" if self.required else "a string"
        return {bool: "true or false", ImageInput: "an image reference", ArrayInput: "an array reference"}.get(
            self.kind, self.kind.__name__
        )

    def check(self, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if self.kind in (ImageInput, ArrayInput):
            if value is None and not self.required:
                return None
            return check_reference(self.name, value, array=self.kind is ArrayInput)
        if self.kind is list:
            return self._check_items(value)
        # bool is an int subclass in Python; never let True pass as 1.
        if isinstance(value, bool) != (self.kind is bool):
            raise invalid(self.name, self.accepted(), value)
        if self.kind is float and isinstance(value, int):
            try:
                value = float(value)
            except OverflowError:  # an integer too large for a float
                raise invalid(self.name, self.accepted(), value) from None
        if not isinstance(value, self.kind):
            raise invalid(self.name, self.accepted(), value)
        if self.kind is float and not math.isfinite(value):
            raise invalid(self.name, self.accepted(), value)
        if self.kind is str:
            if not valid_text(value, self.max_length) or "\x00" in value:
                raise invalid(self.name, f"text of at most {self.max_length} characters (UTF-8, no NUL)", value)
            if self.required and not value.strip():
                raise invalid(self.name, "a non-empty string", value)
        if self.choices and value not in self.choices:
            raise invalid(self.name, self.accepted(), value)
        r = self.range
        if r and (value < r.low or value > r.high or (r.multiple and value % r.multiple)):
            raise invalid(self.name, self.accepted(), value)
        return value

    def _check_items(self, value: Any) -> list[dict]:
        """Each entry through the item table (defaults filled in); a bad one is named by its position,
        e.g. `loras[1].weight`."""
        if not isinstance(value, (list, tuple)) or len(value) > self.max_items:
            raise invalid(self.name, self.accepted(), value)
        checked = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict):
                raise invalid(f"{self.name}[{i}]", "an object with " + ", ".join(p.name for p in self.items), entry)
            unknown = set(entry) - {p.name for p in self.items}
            if unknown:
                raise invalid(f"{self.name}[{i}]", "only the fields " + ", ".join(p.name for p in self.items), entry)
            item = {}
            for p in self.items:
                if p.name in entry:
                    item[p.name] = replace(p, name=f"{self.name}[{i}].{p.name}").check(entry[p.name])
                elif p.required:
                    raise invalid(f"{self.name}[{i}].{p.name}", p.accepted(), None)
                else:
                    item[p.name] = p.default
            checked.append(item)
        return checked

    def to_wire(self) -> dict:
        """The spec as JSON, for the handshake (clients build controls and flags from it)."""
        spec = {"name": self.name, "type": KIND_NAMES[self.kind], "default": self.default, "help": self.help}
        spec.update(accepted=self.accepted(), optional=self.optional, required=self.required)
        if self.range:
            spec["range"] = asdict(self.range)
        if self.choices:
            spec["choices"] = list(self.choices)
        if self.kind is list:
            spec.update(items=[p.to_wire() for p in self.items], max_items=self.max_items, default=list(self.default))
        return spec
