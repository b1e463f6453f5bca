"""The one protocol between the Blender add-on and the backend worker.

Stdlib only: Blender's Python imports this file, and so does the torch worker.
Wire format: one JSON object per line (UTF-8) on the worker's stdin/stdout; logs go to stderr.

Client -> worker
    request       {"id": "r1", "method": "generate", "params": {...}}
    notification  {"method": "cancel", "params": {"id": "r1"}}          (no id, no reply)
Worker -> client
    event         {"id": "r1", "event": "progress", "data": {...}}      (zero or more)
    terminal      {"id": "r1", "result": {...}}
                  {"id": "r1", "error": {"code": "...", "message": "...", "data": {...}}}
                  {"id": "r1", "cancelled": true}

Every request gets exactly one terminal reply. Unknown fields are ignored. See docs/protocol.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PROTOCOL_VERSION = 1

# Methods (requests) and notifications.
HANDSHAKE = "handshake"
GENERATE = "generate"
LOAD_MODEL = "load_model"
SHUTDOWN = "shutdown"
CANCEL = "cancel"
METHODS = (HANDSHAKE, GENERATE, LOAD_MODEL, SHUTDOWN)
NOTIFICATIONS = (CANCEL,)

# Events streamed before the terminal reply.
EVENT_PROGRESS = "progress"  # data: ProgressEvent
EVENT_PREVIEW = "preview"  # data: PreviewEvent
EVENT_STATUS = "status"  # data: {"stage": "loading_model" | "encoding" | "denoising" | "decoding" | "saving"}

# Error codes.
PARSE_ERROR = "parse_error"  # the line is not a JSON object
INVALID_REQUEST = "invalid_request"  # missing/ill-typed id, method or params
METHOD_NOT_FOUND = "method_not_found"
INVALID_PARAMS = "invalid_params"  # a parameter is out of range; message names it and the range
PROTOCOL_MISMATCH = "protocol_mismatch"
MODEL_NOT_FOUND = "model_not_found"
UNSAFE_CHECKPOINT = "unsafe_checkpoint"  # pickle checkpoint without allow_pickle
MODEL_LOAD_FAILED = "model_load_failed"
OUT_OF_MEMORY = "out_of_memory"
INTERNAL_ERROR = "internal_error"  # data.traceback holds the worker's traceback

TASKS = ("txt2img",)  # img2img, inpaint, depth2img, train_lora, travel: later tasks share GenerateParams
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
)
SEAMLESS_AXES = ("none", "x", "y", "xy")
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp16", "bf16", "fp32")
NORMAL_FORMATS = ("opengl", "directx")

SEED_MAX = 2**32 - 1
SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 64, 2048, 8


class ProtocolError(Exception):
    """An error with a protocol code; the worker turns it into an error reply."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message, "data": self.data}


def _invalid(name: str, accepted: str, value: Any) -> ProtocolError:
    return ProtocolError(
        INVALID_PARAMS,
        f"{name} must be {accepted}, got {value!r}",
        {"param": name, "accepted": accepted, "value": value},
    )


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


@dataclass(frozen=True)
class Param:
    """One request parameter: its type, default, accepted values and help text.

    This table drives validation in the worker and the add-on, the CLI flags and the panel's limits,
    so a range is written down exactly once.
    """

    name: str
    kind: type
    default: Any
    help: str
    range: Range | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is accepted (meaning "pick for me", e.g. a random seed)

    def accepted(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.range:
            return self.range.describe(self.kind)
        return {str: "a string", bool: "true or false", dict: "an object"}.get(self.kind, self.kind.__name__)

    def check(self, value: Any) -> Any:
        if value is None and self.optional:
            return None
        # bool is an int subclass in Python; never let True pass as 1.
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
            raise _invalid(self.name, self.accepted(), value)
        if self.kind is float and not math.isfinite(value):
            raise _invalid(self.name, self.accepted(), value)
        if self.choices and value not in self.choices:
            raise _invalid(self.name, self.accepted(), value)
        r = self.range
        if r and (value < r.low or value > r.high or (r.multiple and value % r.multiple)):
            raise _invalid(self.name, self.accepted(), value)
        return value


GENERATE_PARAMS: tuple[Param, ...] = (
    Param("task", str, "txt2img", "What to run.", choices=TASKS),
    Param("model", str, "", "Hub id, local diffusers folder, or single-file .safetensors checkpoint."),
    Param("prompt", str, "", "What to paint."),
    Param("negative_prompt", str, "", "What to avoid."),
    Param("seed", int, None, "Random seed; unset picks one and reports it.", Range(0, SEED_MAX), optional=True),
    Param("steps", int, 25, "Denoising steps.", Range(1, 150)),
    Param("guidance_scale", float, 7.5, "Classifier-free guidance scale (<= 1 disables it).", Range(0.0, 30.0)),
    Param("width", int, 512, "Image width in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("height", int, 512, "Image height in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("batch_size", int, 1, "Images per request.", Range(1, 8)),
    Param("scheduler", str, "euler_a", "Sampler.", choices=SCHEDULERS),
    Param("seamless", str, "none", "Axes on which the texture tiles.", choices=SEAMLESS_AXES),
    Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
    Param("normal_format", str, "opengl", "Normal map convention (opengl = green up).", choices=NORMAL_FORMATS),
    Param("normal_strength", float, 1.0, "Relief of the derived normal map (0 = flat).", Range(0.0, 10.0)),
    Param("height_contrast", float, 1.0, "Contrast of the derived height map.", Range(0.0, 4.0)),
    Param("roughness_contrast", float, 1.0, "Contrast of the derived roughness map (0 = uniform).", Range(0.0, 4.0)),
    Param("ao_strength", float, 1.0, "Darkness of derived ambient occlusion (0 = none).", Range(0.0, 10.0)),
    Param("output_dir", str, "", "Absolute folder the images are written to."),
    Param("filename_prefix", str, "sdtex", "Start of each file name (sanitised)."),
    Param("preview_every", int, 0, "Send a preview every N steps (0 = never).", Range(0, 150)),
    Param("device", str, "auto", "Where to run.", choices=DEVICES),
    Param("dtype", str, "auto", "Precision (auto: fp16 on GPU, fp32 on CPU).", choices=DTYPES),
    Param("cpu_offload", bool, False, "Keep weights on the CPU until needed (less VRAM, slower)."),
    Param("attention_slicing", bool, False, "Compute attention in slices (less memory, slower)."),
    Param("vae_tiling", bool, False, "Decode in tiles (large images on small GPUs; off while seamless)."),
    Param("allow_pickle", bool, False, "Allow pickle checkpoints (.ckpt/.pt/.bin): they can run code."),
)
_PARAMS_BY_NAME = {p.name: p for p in GENERATE_PARAMS}


@dataclass
class GenerateParams:
    """Validated parameters of a generate request (field order and defaults follow GENERATE_PARAMS)."""

    task: str = "txt2img"
    model: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    batch_size: int = 1
    scheduler: str = "euler_a"
    seamless: str = "none"
    pbr: bool = False
    normal_format: str = "opengl"
    normal_strength: float = 1.0
    height_contrast: float = 1.0
    roughness_contrast: float = 1.0
    ao_strength: float = 1.0
    output_dir: str = ""
    filename_prefix: str = "sdtex"
    preview_every: int = 0
    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    attention_slicing: bool = False
    vae_tiling: bool = False
    allow_pickle: bool = False

    @classmethod
    def from_dict(cls, params: Any) -> GenerateParams:
        """Validate a params object; raise ProtocolError(INVALID_PARAMS) naming the first bad value."""
        if not isinstance(params, dict):
            raise ProtocolError(INVALID_REQUEST, f"params must be an object, got {type(params).__name__}")
        values = {}
        for p in GENERATE_PARAMS:
            values[p.name] = p.check(params[p.name]) if p.name in params else p.default
        for name in ("model", "prompt", "output_dir"):
            if not values[name].strip():
                raise _invalid(name, "a non-empty string", values[name])
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


assert [f.name for f in fields(GenerateParams)] == list(_PARAMS_BY_NAME), "GenerateParams out of sync"
assert all(f.default == _PARAMS_BY_NAME[f.name].default for f in fields(GenerateParams))


def param(name: str) -> Param:
    """The spec of one generate parameter (for CLI flags and panel limits)."""
    return _PARAMS_BY_NAME[name]


@dataclass
class ProgressEvent:
    step: int  # 1-based steps done
    total: int
    elapsed: float  # seconds since denoising started
    image_index: int = 0  # reserved for tasks that run several passes


@dataclass
class PreviewEvent:
    step: int
    width: int
    height: int
    rgb: str  # base64 of width*height*3 uint8 bytes, rows top to bottom


@dataclass
class ImageRecord:
    path: str  # absolute path of the PNG (albedo)
    seed: int
    maps: dict[str, str] = field(default_factory=dict)  # "height" | "normal" | "roughness" | "ao" -> path


@dataclass
class GenerateResult:
    images: list[ImageRecord]
    seed: int  # seed of the first image; image i uses seed + i
    width: int
    height: int
    model: str
    seamless: str
    timings: dict[str, float]  # load, encode, denoise, decode, save, total (seconds)
    params: dict  # the full validated GenerateParams

    @classmethod
    def from_dict(cls, data: dict) -> GenerateResult:
        images = [ImageRecord(**{k: v for k, v in i.items() if k in ("path", "seed", "maps")}) for i in data["images"]]
        known = {f.name for f in fields(cls)} - {"images"}
        return cls(images=images, **{k: v for k, v in data.items() if k in known})


@dataclass
class HandshakeResult:
    protocol_version: int
    backend_version: str
    devices: list[str]
    schedulers: list[str]
    tasks: list[str]
    torch_version: str = ""
    diffusers_version: str = ""
    loaded_model: str | None = None


# --- wire helpers -------------------------------------------------------------------------------


def encode(message: dict) -> bytes:
    """One message as a JSON line."""
    return (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def decode(line: bytes | str) -> dict:
    """Parse one line; ProtocolError(PARSE_ERROR) when it is not a JSON object."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(PARSE_ERROR, f"not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(PARSE_ERROR, f"a message must be a JSON object, got {type(message).__name__}")
    return message


def request(request_id: str, method: str, params: dict | None = None) -> dict:
    return {"id": request_id, "method": method, "params": params or {}}


def notification(method: str, params: dict) -> dict:
    return {"method": method, "params": params}


def event(request_id: str, kind: str, data: dict) -> dict:
    return {"id": request_id, "event": kind, "data": data}


def result(request_id: str, data: dict) -> dict:
    return {"id": request_id, "result": data}


def error(request_id: str | None, exc: ProtocolError) -> dict:
    return {"id": request_id, "error": exc.to_wire()}


def cancelled(request_id: str) -> dict:
    return {"id": request_id, "cancelled": True}


def is_terminal(message: dict) -> bool:
    return "result" in message or "error" in message or "cancelled" in message


def check_protocol_version(theirs: Any) -> None:
    if theirs != PROTOCOL_VERSION:
        raise ProtocolError(
            PROTOCOL_MISMATCH,
            f"protocol version mismatch: this side speaks {PROTOCOL_VERSION}, the other side {theirs!r}; "
            "update the add-on and the backend together",
            {"expected": PROTOCOL_VERSION, "got": theirs},
        )
