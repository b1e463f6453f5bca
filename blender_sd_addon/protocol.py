"""The one protocol between the Blender add-on and the backend worker (version 2).

Stdlib only: Blender's Python imports this file, and so does the torch worker.
Wire format: one JSON object per line (UTF-8); logs go elsewhere (stderr). See docs/protocol.md.

Client -> worker
    request       {"id": "r1", "method": "run", "params": {"task": "txt2img", ...}}
    notification  {"method": "cancel", "params": {"id": "r1"}}          (no id, no reply)
Worker -> client
    event         {"id": "r1", "event": "progress", "data": {...}}      (zero or more)
    terminal      {"id": "r1", "result": {...}}
                  {"id": "r1", "error": {"code": "...", "message": "...", "data": {...}}}
                  {"id": "r1", "cancelled": true}

Every request gets exactly one terminal reply. Unknown fields are ignored. Every `run` request is a job
(its id is the request id) with a state, progress and artifacts; jobs queue and run one at a time.
Tasks declare their parameters in TASK_PARAMS; the dataclass of each is generated from its table.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any

# The major version: a different one is refused. Additions within a major are announced as capabilities.
PROTOCOL_VERSION = 2
CAPABILITIES = ("jobs", "upload", "artifacts", "fetch", "tasks")

# Methods (requests). `cancel` may also be sent as a notification (no id, no reply).
HANDSHAKE = "handshake"
RUN = "run"  # start a job: params = {"task": ..., the task's parameters}
LOAD_MODEL = "load_model"
UPLOAD = "upload"  # bytes in, named by their sha256
FETCH = "fetch"  # an artifact's bytes out, in chunks
JOBS = "jobs"  # list jobs
JOB = "job"  # one job
CANCEL = "cancel"
SHUTDOWN = "shutdown"
METHODS = (HANDSHAKE, RUN, LOAD_MODEL, UPLOAD, FETCH, JOBS, JOB, CANCEL, SHUTDOWN)

# Events streamed before the terminal reply.
EVENT_STATE = "state"  # data: {"state": "running"} when a queued job starts
EVENT_STATUS = "status"  # data: {"stage": "loading_model" | "encoding" | "denoising" | "decoding" | "saving"}
EVENT_PROGRESS = "progress"  # data: ProgressEvent
EVENT_PREVIEW = "preview"  # data: PreviewEvent
EVENT_ARTIFACT = "artifact"  # data: Artifact; the file is complete under its final name
EVENT_DOWNLOAD = "download"  # data: DownloadProgress (download_model; `progress` counts the same bytes)

# Job states.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED_STATES = (DONE, FAILED, CANCELLED)

# Error codes.
PARSE_ERROR = "parse_error"  # the line is not a JSON object (or too long)
INVALID_REQUEST = "invalid_request"  # missing/ill-typed id, method or params
METHOD_NOT_FOUND = "method_not_found"
INVALID_PARAMS = "invalid_params"  # a parameter is out of range; message names it and what is accepted
PROTOCOL_MISMATCH = "protocol_mismatch"
MODEL_NOT_FOUND = "model_not_found"
UNSAFE_CHECKPOINT = "unsafe_checkpoint"  # pickle checkpoint without allow_pickle
MODEL_LOAD_FAILED = "model_load_failed"
OUT_OF_MEMORY = "out_of_memory"
OUTPUT_FAILED = "output_failed"  # output_dir not writable, disk full; message names the folder
NOT_FOUND = "not_found"  # unknown job id or artifact
SHUTTING_DOWN = "shutting_down"  # a request sent after shutdown (or after the input ended)
INTERNAL_ERROR = "internal_error"  # data.traceback holds the worker's traceback
DOWNLOAD_FAILED = "download_failed"  # the hub is unreachable or refuses, or the repository cannot be used
NOT_ENOUGH_SPACE = "not_enough_space"  # message names the folder, the space needed and the space free

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


class ProtocolError(Exception):
    """An error with a protocol code; the worker turns it into an error reply."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message, "data": self.data}


def shown(value: Any, limit: int = 80) -> str:
    """A short, always-encodable rendering of a value for messages (never the value itself: a bad value
    may be 10 MB long, NaN or a lone surrogate)."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(name: str, accepted: str, value: Any) -> ProtocolError:
    return ProtocolError(
        INVALID_PARAMS,
        f"{name} must be {accepted}, got {shown(value)}",
        {"param": name, "accepted": accepted, "value": shown(value)},
    )


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


# Shared groups: tasks combine these with their own parameters.
MODEL_PARAMS: tuple[Param, ...] = (
    Param(
        "model", str, "", "Hub id, local diffusers folder, or single-file .safetensors checkpoint.",
        required=True, max_length=PATH_MAX, path=READS_OR_HUB,
    ),
    Param("device", str, "auto", "Where to run.", choices=DEVICES),
    Param("dtype", str, "auto", "Precision (auto: fp16 on GPU, fp32 on CPU).", choices=DTYPES),
    Param("cpu_offload", bool, False, "Keep weights on the CPU until needed (less VRAM, slower)."),
    Param("attention_slicing", bool, False, "Compute attention in slices (less memory, slower)."),
    Param("allow_pickle", bool, False, "Allow pickle checkpoints (.ckpt/.pt/.bin): they can run code."),
    Param(
        "loras", list, (),
        "LoRAs to apply, each a .safetensors file, a folder holding one, or a hub id, with a weight.",
        items=(
            Param(
                "model", str, "", "LoRA file, folder or hub id.", required=True, max_length=PATH_MAX,
                path=READS_OR_HUB,
            ),
            Param("weight", float, 1.0, "Strength (negative: the opposite).", Range(-4.0, 4.0)),
        ),
        max_items=LORAS_MAX,
    ),
)
SAMPLING_PARAMS: tuple[Param, ...] = (
    Param("prompt", str, "", "What to paint.", required=True),
    Param("negative_prompt", str, "", "What the picture should not show (e.g. text, blur)."),
    Param(
        "seed", int, None, "The same seed with the same settings makes the same picture; unset picks one.",
        Range(0, SEED_MAX), optional=True,
    ),
    Param("steps", int, 25, "More steps add detail and take longer (20 to 30 suit most models).", Range(1, 150)),
    Param(
        "guidance_scale", float, 7.5,
        "How closely to follow the prompt: about 7 suits most models, higher is stricter but harsher (1 or less: off).",
        Range(0.0, 30.0),
    ),
    Param("width", int, 512, "Image width in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("height", int, 512, "Image height in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("batch_size", int, 1, "How many pictures to make at once, each with its own seed.", Range(1, 8)),
    Param(
        "scheduler", str, "euler_a", "The sampling method: Euler Ancestral suits most models; LCM only LCM models.",
        choices=SCHEDULERS,
    ),
    Param("seamless", str, "none", "Make the texture repeat without seams across X, Y or both.", choices=SEAMLESS_AXES),
    Param("preview_every", int, 0, "Send a preview every N steps (0 = never).", Range(0, 150)),
    Param("vae_tiling", bool, False, "Decode in tiles (large images on small GPUs; off while seamless)."),
)
PBR_MAP_PARAMS: tuple[Param, ...] = (
    Param("normal_format", str, "opengl", "Normal map convention (opengl = green up).", choices=NORMAL_FORMATS),
    Param("normal_strength", float, 1.0, "Relief of the derived normal map (0 = flat).", Range(0.0, 10.0)),
    Param("height_contrast", float, 1.0, "Contrast of the derived height map.", Range(0.0, 4.0)),
    Param("roughness_contrast", float, 1.0, "Contrast of the derived roughness map (0 = uniform).", Range(0.0, 4.0)),
    Param("ao_strength", float, 1.0, "Darkness of derived ambient occlusion (0 = none).", Range(0.0, 10.0)),
)
OUTPUT_PARAMS: tuple[Param, ...] = (
    Param(
        "output_dir", str, "", "Absolute folder the files are written to.", required=True, max_length=PATH_MAX,
        path=WRITES,
    ),
    Param("filename_prefix", str, "sdtex", "Start of each file name (sanitised).", max_length=200),
)
# Tasks that start from an image: the image, how it meets width/height, and seamless with "auto".
SOURCE_PARAMS: tuple[Param, ...] = (
    Param("image", ImageInput, None, "The image to start from.", required=True),
    Param(
        "resize",
        str,
        "fit",
        "How the image meets width and height: fit inside, fill and crop, stretch, or keep its own size.",
        choices=RESIZE_MODES,
    ),
)
SEAMLESS_INPUT = Param(
    "seamless", str, "none", "Axes on which the result tiles (auto: those the input tiles on).",
    choices=SEAMLESS_INPUT_AXES,
)  # fmt: skip


def replaced(table: tuple[Param, ...], *new: Param) -> tuple[Param, ...]:
    """A parameter group with some entries swapped by name (e.g. seamless with "auto" for image tasks)."""
    by_name = {p.name: p for p in new}
    return tuple(by_name.get(p.name, p) for p in table)


# Inpainting (and outpainting, and make_seamless, which inpaint too): where the mask comes from, its edge,
# how much the masked area changes. Pixels outside the feathered mask come back unchanged, byte for byte.
MASK_SOURCES = ("image", "alpha", "rect", "none")
OUTPAINT_FILLS = ("edge", "noise")
RESIZE_KEEP = Param(
    "resize", str, "keep",
    "How the image meets width and height: keep its own size (the default: every kept pixel comes back "
    "unchanged), fit inside, fill and crop, or stretch.",
    choices=RESIZE_MODES,
)  # fmt: skip
MASK_BLUR = Param(
    "mask_blur", int, 4, "Feather radius of the mask's edge in pixels (0 = hard edge).", Range(0, 256)
)  # fmt: skip
STRENGTH = Param(
    "strength", float, 1.0, "How much the masked area changes (1 = repainted from noise).", Range(0.0, 1.0)
)  # fmt: skip
INPAINT_PARAMS: tuple[Param, ...] = (
    Param("mask", ImageInput, None, "The mask, white = repaint, the image's size (mask_from image)."),
    Param(
        "mask_from", str, "image",
        "Where the mask comes from: the mask image, the image's alpha (transparent = repaint), a rectangle "
        "(mask_x, mask_y, mask_width, mask_height), or none (outpainting only).",
        choices=MASK_SOURCES,
    ),
    Param("mask_x", int, 0, "Rectangle mask: left edge, in pixels of the image.", Range(0, 8192)),
    Param("mask_y", int, 0, "Rectangle mask: top edge, in pixels of the image.", Range(0, 8192)),
    Param("mask_width", int, 0, "Rectangle mask: width in pixels (at least 1 for mask_from rect).", Range(0, 8192)),
    Param("mask_height", int, 0, "Rectangle mask: height in pixels (at least 1 for mask_from rect).", Range(0, 8192)),
    MASK_BLUR,
    STRENGTH,
    Param("extend_left", int, 0, "Outpainting: pixels added on the left.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param("extend_right", int, 0, "Outpainting: pixels added on the right.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param("extend_top", int, 0, "Outpainting: pixels added at the top.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param("extend_bottom", int, 0, "Outpainting: pixels added at the bottom.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param(
        "outpaint_fill", str, "edge",
        "What the added area starts from: its border pixels stretched out, or noise.", choices=OUTPAINT_FILLS,
    ),
)  # fmt: skip
MAKE_SEAMLESS_PARAMS: tuple[Param, ...] = (
    Param(
        "band_width", int, 64, "Width of the band repainted across each wrap-around seam, in pixels.",
        Range(8, SIZE_MAX, SIZE_MULTIPLE),
    ),
    MASK_BLUR,
    STRENGTH,
)  # fmt: skip


# img2img / variations: the source picture noised to `strength`, then denoised with the prompt.
IMG2IMG_STRENGTH = Param(
    "strength", float, 0.6,
    "How much of the image is repainted: 0 returns it unchanged (no model run), 1 starts from noise "
    "(a faint trace of its colours stays). The denoising steps run are int(steps * strength).",
    Range(0.0, 1.0),
)  # fmt: skip
# Upscaling: the SD x4 upscaler when given one, else tiled img2img ("hires fix") with `model`.
UPSCALE_PARAMS: tuple[Param, ...] = (
    Param(
        "upscaler_model", str, "",
        "An SD x4 upscaler (hub id, local diffusers folder or .safetensors file); empty: tiled img2img with model.",
        max_length=PATH_MAX, path=READS_OR_HUB,
    ),
    Param("image", ImageInput, None, "The image to upscale.", required=True),
    Param("scale", int, 2, "Upscaling factor: 2 or 4.", Range(2, 4, 2)),
    Param(
        "noise_level", int, 20, "x4 upscaler: noise added to the small image (more: more invented detail).",
        Range(0, 350),
    ),
    Param(
        "strength", float, 0.35, "Tiled upscaling: how much each tile is repainted (0 = Lanczos only, no model).",
        Range(0.0, 1.0),
    ),
    Param(
        "tile_size", int, 0, "Tiled upscaling: tile size in pixels (0 = the model's native size).",
        Range(0, SIZE_MAX, SIZE_MULTIPLE),
    ),
    Param(
        "tile_overlap", int, 64, "Tiled upscaling: pixels neighbouring tiles share, blended smoothly.",
        Range(0, 1024, SIZE_MULTIPLE),
    ),
)  # fmt: skip
UPSCALE_SAMPLING: tuple[Param, ...] = replaced(
    tuple(p for p in SAMPLING_PARAMS if p.name not in ("width", "height", "batch_size", "vae_tiling")),
    Param("prompt", str, "", "What the picture shows (guides the added detail; may be empty)."),
    SEAMLESS_INPUT,
)

# Models: download a hub pipeline (only the files it needs), list what is on disk.
WEIGHT_VARIANTS = ("fp16", "fp32")
DOWNLOAD_MODEL_PARAMS: tuple[Param, ...] = (
    Param(
        "model", str, "", "Hub id of a diffusers pipeline, e.g. stabilityai/sd-turbo.", required=True, max_length=200
    ),
    Param("revision", str, "main", "Branch, tag or commit to download.", max_length=200),
    Param(
        "variant", str, "fp16",
        "Weights to fetch: fp16 (half the size) where the repository has them, else full precision; or fp32.",
        choices=WEIGHT_VARIANTS,
    ),
    Param(
        "local_dir", str, "",
        "Absolute folder to download into as a plain model folder; empty: the Hugging Face cache.",
        max_length=PATH_MAX, path=WRITES,
    ),
)  # fmt: skip
LIST_MODELS_PARAMS: tuple[Param, ...] = (
    Param(
        "models_dir", str, "",
        "Absolute folder of models to list too (diffusers folders and .safetensors files); empty: none.",
        max_length=PATH_MAX, path=READS,
    ),
    Param("include_cache", bool, True, "List the diffusers pipelines in the Hugging Face cache."),
)  # fmt: skip

# Latent travel: an animation through keyframes (prompt, negative prompt, seed), every frame a full generation.
EASINGS = ("linear", "ease_in_out")
EMBEDDING_INTERPOLATIONS = ("linear", "slerp")
TRAVEL_EXPORTS = ("none", "mp4", "webp", "gif")
KEYFRAMES_MAX, TRAVEL_FRAMES_MAX = 64, 1000
KEYFRAME_ITEMS: tuple[Param, ...] = (
    Param("prompt", str, "", "What this keyframe shows.", required=True),
    Param("negative_prompt", str, "", "What to avoid at this keyframe."),
    Param("seed", int, None, "This keyframe's seed; unset picks one.", Range(0, SEED_MAX), optional=True),
)
TRAVEL_PARAMS: tuple[Param, ...] = (
    Param(
        "keyframes", list, (), "The keyframes the animation passes through, in order (at least 2).",
        required=True, items=KEYFRAME_ITEMS, max_items=KEYFRAMES_MAX,
    ),
    Param(
        "frames", int, 12, "Frames per transition: from one keyframe (included) to the next (not included).",
        Range(1, TRAVEL_FRAMES_MAX),
    ),
    Param("loop", bool, False, "Travel from the last keyframe back to the first: the animation cycles without a jump."),
    Param(
        "easing", str, "linear", "Pace of each transition: linear, or ease_in_out (slows down at the keyframes).",
        choices=EASINGS,
    ),
    Param(
        "embedding_interpolation", str, "linear", "How the prompts' embeddings blend: linear or slerp (spherical).",
        choices=EMBEDDING_INTERPOLATIONS,
    ),
    Param(
        "export", str, "none", "Also write the frames as one animation: mp4 (needs imageio-ffmpeg), webp or gif.",
        choices=TRAVEL_EXPORTS,
    ),
    Param("fps", int, 24, "Frames per second of the exported animation.", Range(1, 120)),
)  # fmt: skip


def travel_length(keyframes: int, frames: int, loop: bool) -> int:
    """Frames in a travel: `frames` per transition; open, the last keyframe ends it; looped, one transition
    more leads back to the first keyframe (frame 0 would follow the last)."""
    return frames * keyframes if loop else frames * (keyframes - 1) + 1


# The sampling group without what each keyframe sets itself (one picture per frame: no batch).
TRAVEL_SAMPLING = tuple(p for p in SAMPLING_PARAMS if p.name not in ("prompt", "negative_prompt", "seed", "batch_size"))

# DreamBooth-LoRA training: photos of a subject (or a style) and a prompt with a rare token; the result is a LoRA.
TRAIN_MODEL_PARAMS = tuple(p for p in MODEL_PARAMS if p.name in ("model", "device", "dtype", "allow_pickle"))
TRAIN_LORA_PARAMS: tuple[Param, ...] = (
    Param("photos_dir", str, "", "Folder of photos (JPEG, PNG, WebP; any size).", max_length=PATH_MAX, path=READS),
    Param(
        "photo_files", list, (), "Photo files, instead of (or besides) a folder.",
        items=(Param("path", str, "", "Absolute path of a photo.", required=True, max_length=PATH_MAX, path=READS),),
        max_items=1000,
    ),
    Param("token", str, "sks", "The rare word that names the subject; it must appear in instance_prompt."),
    Param("instance_prompt", str, "", "What the photos show, with the token: 'a photo of sks wood'.", required=True),
    Param(
        "class_prompt", str, "",
        "The subject's class without the token (e.g. 'a photo of wood'): turns on prior preservation with "
        "images the model makes of it. Empty: off.",
    ),
    Param("class_images", int, 50, "Prior preservation: how many class images (made once, cached).", Range(1, 1000)),
    Param("prior_loss_weight", float, 1.0, "Prior preservation: weight of the class images' loss.", Range(0.0, 10.0)),
    Param(
        "class_images_dir", str, "", "Where class images are cached (empty: the user cache folder).",
        max_length=PATH_MAX, path=WRITES,
    ),
    Param("resolution", int, 512, "Training size in pixels (photos: scaled, centre-cropped).", Range(32, 1024, 8)),
    Param("steps", int, 500, "Training steps (optimizer updates).", Range(1, 100_000)),
    Param("learning_rate", float, 1e-4, "AdamW learning rate.", Range(1e-7, 0.1)),
    Param("rank", int, 4, "LoRA rank: more learns more detail, and makes a larger file.", Range(1, 256)),
    Param("batch_size", int, 1, "Photos per step.", Range(1, 16)),
    Param("train_text_encoder", bool, False, "Also train a LoRA on the text encoder (learns the token better)."),
    Param("seed", int, 0, "Seed of the LoRA's start, the noise and the photo order.", Range(0, SEED_MAX)),
    Param("sample_prompt", str, "", "Prompt of the sample images (empty: instance_prompt)."),
    Param("sample_every", int, 0, "Make a sample image every N steps, and at the end (0 = never).", Range(0, 100_000)),
    Param("checkpoint_every", int, 0, "A resumable checkpoint every N steps (0: on cancel only).", Range(0, 100_000)),
    Param(
        "resume_from", str, "", "A checkpoint file to continue (same photos and settings).", max_length=PATH_MAX,
        path=READS,
    ),
)  # fmt: skip


# Projection texturing: depth-guided views of meshes, projected back and baked into each object's UV texture.
PROJECT_SAMPLING = replaced(
    tuple(p for p in SAMPLING_PARAMS if p.name not in ("batch_size", "seamless", "vae_tiling")),
    Param("width", int, 512, "Width of each view in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("height", int, 512, "Height of each view in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
)
PROJECT_PARAMS: tuple[Param, ...] = (
    Param(
        "controlnet", str, "",
        "Depth ControlNet for the model: hub id, local folder or single-file .safetensors "
        "(e.g. lllyasviel/control_v11f1p_sd15_depth).",
        required=True, max_length=PATH_MAX, path=READS_OR_HUB,
    ),
    Param("controlnet_scale", float, 1.0, "How strongly the depth steers the picture.", Range(0.0, 2.0)),
    Param("control_start", float, 0.0, "Fraction of the steps after which the depth starts to steer.", Range(0.0, 1.0)),
    Param("control_end", float, 1.0, "Fraction of the steps after which the depth stops steering.", Range(0.0, 1.0)),
    Param("triangles", ArrayInput, None, "float32 [..., 3, 3]: each triangle's corners in world space.", required=True),
    Param("uvs", ArrayInput, None, "float32 [..., 3, 2]: each corner's UV (v up), as triangles.", required=True),
    Param(
        "object_index", ArrayInput, None,
        "int32 [...]: each triangle's object (0, 1, ...: textured; -1: only occludes), as triangles.", required=True,
    ),
    Param(
        "cameras", ArrayInput, None,
        "float32 [views, 2, 4, 4]: per view, world to camera (Blender's camera, looking down -Z) and the OpenGL "
        "projection.",
        required=True,
    ),
    Param("texture_size", int, 1024, "Size of each object's baked texture in pixels (square).", Range(64, 4096, 8)),
    Param("margin", int, 8, "Texels painted around each UV island, so filtering shows no seams.", Range(0, 64)),
    Param(
        "refine_below", float, 0.3,
        "Later views repaint surface the earlier ones saw only at a facing cosine below this (0: only unseen).",
        Range(0.0, 1.0),
    ),
    MASK_BLUR,
    Param("allow_uv_overlap", bool, False, "Bake even where UV islands overlap (they then share paint)."),
    Param(
        "apply_unseen", bool, False,
        "Give objects no view saw (hidden inside another, say) their flat grey texture anyway; off: they keep "
        "the material they had.",
    ),
)  # fmt: skip


def _task(name: str) -> Param:
    return Param("task", str, name, "What to run.", choices=(name,))


TASK_PARAMS: dict[str, tuple[Param, ...]] = {
    "txt2img": (
        _task("txt2img"),
        *MODEL_PARAMS,
        *SAMPLING_PARAMS,
        Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
    "pbr": (
        _task("pbr"),
        Param("image", ImageInput, None, "The albedo to derive maps from.", required=True),
        Param("seamless", str, "none", "Axes on which the image tiles (the maps will too).", choices=SEAMLESS_AXES),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
    "inpaint": (
        _task("inpaint"),
        *MODEL_PARAMS,
        *replaced(SAMPLING_PARAMS, SEAMLESS_INPUT),
        *replaced(SOURCE_PARAMS, RESIZE_KEEP),
        *INPAINT_PARAMS,
        Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
    "make_seamless": (
        _task("make_seamless"),
        *MODEL_PARAMS,
        *replaced(
            SAMPLING_PARAMS,
            Param("seamless", str, "xy", "Axes on which the result must tile.", choices=SEAMLESS_AXES[1:]),
        ),
        *replaced(SOURCE_PARAMS, RESIZE_KEEP),
        *MAKE_SEAMLESS_PARAMS,
        Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
    "img2img": (
        _task("img2img"),
        *MODEL_PARAMS,
        *replaced(SAMPLING_PARAMS, SEAMLESS_INPUT),
        *SOURCE_PARAMS,
        IMG2IMG_STRENGTH,
        Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
    "upscale": (
        _task("upscale"),
        *replaced(
            MODEL_PARAMS,
            Param(
                "model", str, "",
                "Model for tiled upscaling (hub id, local diffusers folder or .safetensors); not used with "
                "upscaler_model.",
                max_length=PATH_MAX, path=READS_OR_HUB,
            ),
        ),
        *UPSCALE_PARAMS,
        *UPSCALE_SAMPLING,
        Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
    "download_model": (_task("download_model"), *DOWNLOAD_MODEL_PARAMS),
    "list_models": (_task("list_models"), *LIST_MODELS_PARAMS),
    "train_lora": (_task("train_lora"), *TRAIN_MODEL_PARAMS, *TRAIN_LORA_PARAMS, *OUTPUT_PARAMS),
    "travel": (
        _task("travel"),
        *MODEL_PARAMS,
        *TRAVEL_SAMPLING,
        *TRAVEL_PARAMS,
        Param("pbr", bool, False, "Also write height, normal, roughness and AO maps of every frame."),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
    "project": (
        _task("project"),
        *MODEL_PARAMS,
        *PROJECT_SAMPLING,
        *PROJECT_PARAMS,
        Param("pbr", bool, False, "Also write height, normal, roughness and AO maps of each baked texture."),
        *PBR_MAP_PARAMS,
        *OUTPUT_PARAMS,
    ),
}
TASKS = tuple(TASK_PARAMS)
TASK_HELP = {
    "txt2img": "Text to image: a texture from a prompt, optionally tiling, with PBR maps.",
    "pbr": "PBR maps (height, normal, roughness, AO) derived from a given image.",
    "inpaint": "Repaint the masked part of an image (or outpaint: extend its canvas); the rest comes back unchanged.",
    "make_seamless": "Repaint the wrap-around seams of an image so that it tiles; the rest comes back unchanged.",
    "img2img": "Image to image: variations of a picture, repainted as much as strength says, optionally tiling.",
    "upscale": "Upscale 2x or 4x: the SD x4 upscaler when given one, else tiled img2img; tiling stays tiling.",
    "download_model": "Download a hub pipeline's needed files (configs, tokenizers, safetensors weights).",
    "list_models": "The models on disk: diffusers pipelines in the Hugging Face cache, and a models folder's contents.",
    "train_lora": "Train a LoRA (DreamBooth) on photos of a subject or a style, with samples and checkpoints.",
    "travel": "Latent travel: an animated texture morphing through keyframes (prompt, seed), as an image sequence.",
    "project": "Texture meshes: depth-guided views generated in turn, projected back and baked into their UV textures.",
}


class TaskParams:
    """Base of the generated parameter dataclasses (one per task, fields and defaults from its table)."""

    TABLE: tuple[Param, ...] = ()

    @classmethod
    def from_dict(cls, params: Any):
        """Validate a params object; raise ProtocolError(INVALID_PARAMS) naming the first bad value.
        Unknown keys are ignored (they may belong to a newer client)."""
        if not isinstance(params, dict):
            raise ProtocolError(INVALID_REQUEST, f"params must be an object, got {type(params).__name__}")
        values = {}
        for p in cls.TABLE:
            if p.name in params:
                values[p.name] = p.check(params[p.name])
            elif p.required:
                raise invalid(p.name, p.accepted(), None)
            else:
                values[p.name] = list(p.default) if p.kind is list else p.default
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def params_class(task: str) -> type:
    """The dataclass of one task's parameters, generated from its table."""
    table = TASK_PARAMS[task]
    name = "".join(part.title() for part in task.split("_")) + "Params"
    specs = [(p.name, Any, field(default_factory=list) if p.kind is list else field(default=p.default)) for p in table]
    return make_dataclass(name, specs, bases=(TaskParams,), namespace={"TABLE": table})


PARAMS_CLASSES: dict[str, type] = {task: params_class(task) for task in TASKS}
GenerateParams = Txt2ImgParams = PARAMS_CLASSES["txt2img"]
PbrParams = PARAMS_CLASSES["pbr"]
InpaintParams = PARAMS_CLASSES["inpaint"]
MakeSeamlessParams = PARAMS_CLASSES["make_seamless"]
Img2ImgParams = PARAMS_CLASSES["img2img"]
UpscaleParams = PARAMS_CLASSES["upscale"]
DownloadModelParams = PARAMS_CLASSES["download_model"]
ListModelsParams = PARAMS_CLASSES["list_models"]
TrainLoraParams = PARAMS_CLASSES["train_lora"]
TravelParams = PARAMS_CLASSES["travel"]
ProjectParams = PARAMS_CLASSES["project"]
GENERATE_PARAMS = TASK_PARAMS["txt2img"]
def param(name: str, task: str | None = None) -> Param:
    """The spec of one parameter by name (for CLI flags and panel limits): in `task`'s table, or in the
    first task (in TASKS order, txt2img first) that has it."""
    for table in [TASK_PARAMS[task]] if task else TASK_PARAMS.values():
        for p in table:
            if p.name == name and name != "task":
                return p
    raise KeyError(name)


def task_params(params: Any) -> TaskParams:
    """Validate a `run` request's params: the task first, then that task's table."""
    task = params.get("task") if isinstance(params, dict) else None
    if not isinstance(task, str) or task not in PARAMS_CLASSES:
        raise invalid("task", "one of " + ", ".join(TASKS), task)
    return PARAMS_CLASSES[task].from_dict(params)


def model_params(params: Any) -> TaskParams:
    """Validate the model-related subset (for load_model): a txt2img parameter set with dummy output."""
    if not isinstance(params, dict):
        raise ProtocolError(INVALID_REQUEST, f"params must be an object, got {type(params).__name__}")
    names = {p.name for p in MODEL_PARAMS}
    chosen = {k: v for k, v in params.items() if k in names}
    return GenerateParams.from_dict({**chosen, "prompt": "warm-up", "output_dir": "/unused"})


def task_specs() -> dict:
    """Every task's parameter specs, as the handshake lists them."""
    return {task: {"help": TASK_HELP[task], "params": [p.to_wire() for p in TASK_PARAMS[task]]} for task in TASKS}


# --- events and results -----------------------------------------------------------------------------


@dataclass
class ProgressEvent:
    step: int  # 1-based steps done
    total: int
    elapsed: float  # seconds since denoising started
    image_index: int = 0  # reserved for tasks that run several passes; travel: the frame (0-based)
    frames: int = 0  # travel: frames in the sequence ("frame image_index + 1 of frames, step of total")


@dataclass
class PreviewEvent:
    step: int
    width: int
    height: int
    rgb: str  # base64 of width*height*3 uint8 bytes, rows top to bottom


@dataclass
class Artifact:
    """A file a job made, announced once it is complete under its final name."""

    path: str  # absolute path on the worker's machine (fetch it with `fetch` when remote)
    kind: str  # "image" (an albedo), "map" (a PBR map), later "frame", "view", "sample", "checkpoint"
    size: int  # bytes
    sha256: str
    index: int = 0  # which image of the job it belongs to
    role: str = "albedo"  # "albedo" | "height" | "normal" | "roughness" | "ao" | ...


@dataclass
class ImageRecord:
    path: str  # absolute path of the PNG (albedo; for the pbr task, the source image's path or "")
    seed: int | None
    maps: dict[str, str] = field(default_factory=dict)  # "height" | "normal" | "roughness" | "ao" -> path


@dataclass
class GenerateResult:
    """The result of every image task (txt2img, pbr): images with their maps, and how they were made."""

    images: list[ImageRecord]
    seed: int | None  # seed of the first image; image i uses seed + i (None when nothing was sampled)
    width: int
    height: int
    model: str
    seamless: str
    timings: dict[str, float]  # load, encode, denoise, decode, save, total (seconds)
    params: dict  # the full validated parameters
    task: str = "txt2img"
    artifacts: list[dict] = field(default_factory=list)  # every Artifact of the job, in order

    @classmethod
    def from_dict(cls, data: dict) -> GenerateResult:
        images = [ImageRecord(**{k: v for k, v in i.items() if k in ("path", "seed", "maps")}) for i in data["images"]]
        known = {f.name for f in fields(cls)} - {"images"}
        return cls(images=images, **{k: v for k, v in data.items() if k in known})


@dataclass
class ViewRecord:
    """One view of a `project` job: what it generated and on what, each file on disk (paths "" when the view
    had nothing left to paint and was skipped)."""

    index: int
    seed: int | None
    image: str  # the generated picture (after paste-back of what was already painted)
    mask: str  # white = painted by this view
    depth: str  # the depth conditioning (near = bright)
    normal: str  # camera-space normals as colours
    new_pixels: int  # pixels of surface this view painted
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # render, generate, bake (seconds)


@dataclass
class ProjectResult(GenerateResult):
    """The `project` task's result: `images` holds one baked texture per object (object_index order)."""

    task: str = "project"
    texture_size: int = 0
    coverage: list[float] = field(default_factory=list)  # per object: fraction of its texels some view saw
    unseen: list[int] = field(default_factory=list)  # objects no view saw (coverage 0): a flat grey texture
    views: list[dict] = field(default_factory=list)  # ViewRecord per view, in order
    warnings: list[str] = field(default_factory=list)


@dataclass
class DownloadProgress:
    """download_model's `download` event: how far the download is."""

    bytes_done: int
    bytes_total: int  # what this job fetches; files already on disk are not counted
    files_done: int
    files_total: int
    speed: float  # bytes per second over the last few seconds
    elapsed: float  # seconds since the transfer began


def _from_known(cls: type, data: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class DownloadResult:
    """download_model's result."""

    model: str  # what to pass as `model` from now on: the hub id (cache) or the folder (local_dir)
    path: str  # the folder holding the files (the cache snapshot, or local_dir)
    revision: str  # the commit downloaded
    files: list[str]  # repository paths of the files the model needs, all on disk now
    size: int  # bytes of those files
    downloaded: int  # bytes this job fetched (0 when everything was there)
    family: str  # "sd" | "sdxl"
    variant: str  # "fp16" when any weights are the fp16 files, else "fp32"
    seconds: float
    task: str = "download_model"
    artifacts: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> DownloadResult:
        return _from_known(cls, data)


@dataclass
class ModelEntry:
    """One model on disk, as list_models reports it."""

    model: str  # the value for `model`: hub id, folder or file path
    kind: str  # "hub" (Hugging Face cache) | "folder" (diffusers folder) | "single_file"
    name: str  # for people: the hub id or the file/folder name
    path: str  # where it is on disk
    size: int  # bytes on disk
    family: str = ""  # "sd" | "sdxl"; "" when not usable
    base: str = ""  # "sd1" | "sd2" | "sdxl": the architecture it was trained as
    native_size: int = 0  # training resolution in pixels (0: unknown)
    inpainting: bool = False  # a 9-channel inpainting U-Net
    usable: bool = True
    problem: str = ""  # why it cannot be used, for people
    defaults: dict = field(default_factory=dict)  # settings that suit it (blender_sd_addon.model_catalog)

    @classmethod
    def from_dict(cls, data: dict) -> ModelEntry:
        return _from_known(cls, data)


@dataclass
class ModelList:
    """list_models' result."""

    models: list[dict]  # ModelEntry, hub models first, then the models folder's, each sorted by name
    cache_dir: str  # the Hugging Face cache that was scanned ("" when include_cache was false)
    models_dir: str
    seconds: float
    task: str = "list_models"
    artifacts: list[dict] = field(default_factory=list)
    loras: list[dict] = field(default_factory=list)  # LoRA files in models_dir: {"model", "name", "size", "base"}

    @classmethod
    def from_dict(cls, data: dict) -> ModelList:
        return _from_known(cls, data)

    def entries(self) -> list[ModelEntry]:
        return [ModelEntry.from_dict(entry) for entry in self.models]


@dataclass
class TrainProgress(ProgressEvent):
    """train_lora's `progress` event: a ProgressEvent (steps done, total) with the step's loss."""

    loss: float = 0.0  # the last step's training loss
    seconds_left: float = 0.0  # estimated from this run's steps so far


@dataclass
class TrainResult:
    """train_lora's result."""

    lora: str  # the LoRA file (.safetensors, diffusers layout, training settings in its metadata)
    steps: int  # steps trained in all (a resumed run counts the checkpoint's)
    loss: float  # mean loss of the last steps
    losses: list[float]  # every step's loss, this run's and (resumed) the checkpoint's
    photos: list[str]  # the photos trained on
    skipped: list[dict]  # {"path", "reason"}: files that were not usable photos
    samples: list[str]  # sample images, in order
    checkpoints: list[str]  # checkpoint files written
    seconds: float
    params: dict
    task: str = "train_lora"
    artifacts: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> TrainResult:
        return _from_known(cls, data)


@dataclass
class JobInfo:
    """A job as `jobs` and `job` report it."""

    id: str | int
    task: str
    state: str  # one of JOB_STATES
    stage: str = ""
    step: int = 0
    total: int = 0
    elapsed: float = 0.0
    artifacts: list[dict] = field(default_factory=list)
    error: dict | None = None  # {"code", "message", "data"} once failed
    cancel_requested: bool = False
    queued_ahead: int = 0  # jobs before it in the queue (queued state only)


@dataclass
class HandshakeResult:
    protocol_version: int
    backend_version: str
    devices: list[str]
    schedulers: list[str]
    tasks: dict  # task name -> {"help", "params": [Param.to_wire()]}
    capabilities: list[str] = field(default_factory=list)
    torch_version: str = ""
    diffusers_version: str = ""
    loaded_model: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # task -> why the installed packages cannot run it

    @classmethod
    def from_dict(cls, data: dict) -> HandshakeResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- wire helpers -------------------------------------------------------------------------------


def encode(message: dict) -> bytes:
    """One message as a JSON line. Raises ValueError for NaN/Infinity or text that is not UTF-8."""
    return (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def decode(line: bytes | str) -> dict:
    """Parse one line; ProtocolError(PARSE_ERROR) when it is not a JSON object (or nests too deep)."""
    if len(line) > MAX_LINE:
        raise ProtocolError(PARSE_ERROR, f"message too long: {len(line)} bytes, at most {MAX_LINE}")
    try:
        message = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(PARSE_ERROR, f"not valid JSON: {shown(str(exc), 200)}") from None
    if not isinstance(message, dict):
        raise ProtocolError(PARSE_ERROR, f"a message must be a JSON object, got {type(message).__name__}")
    return message


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity


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


def request_id_of(message: dict) -> str | int | None:
    """The message's id when it is a usable one (a short string or an integer), else None."""
    request_id = message.get("id")
    if isinstance(request_id, str) and valid_text(request_id, 200):
        return request_id
    if isinstance(request_id, int) and not isinstance(request_id, bool) and abs(request_id) < 2**53:
        return request_id
    return None


def check_protocol_version(theirs: Any) -> None:
    """Refuse another major version; within one major, capabilities tell what the other side has."""
    if theirs != PROTOCOL_VERSION:
        raise ProtocolError(
            PROTOCOL_MISMATCH,
            f"protocol version mismatch: this side speaks {PROTOCOL_VERSION}, the other side {shown(theirs)}; "
            "update the add-on and the backend together",
            {"expected": PROTOCOL_VERSION, "got": shown(theirs)},
        )


def missing_capabilities(theirs: Any, needed: tuple[str, ...] = CAPABILITIES) -> list[str]:
    have = set(theirs) if isinstance(theirs, list) else set()
    return [c for c in needed if c not in have]
