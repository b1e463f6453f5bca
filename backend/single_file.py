"""Single-file checkpoints: `.safetensors` files in the original Stable Diffusion layout, loaded with no network.

diffusers' own checkpoint inference (`infer_diffusers_model_type`) names the model type from the tensor names and
shapes, read from the file's header only (no weights are read to decide). Each supported type has a config folder
shipped in backend/configs/ (the public configs' values, see its README), passed to `from_single_file` with
`local_files_only=True`; the CLIP tokenizers are built in memory from the one shipped copy of CLIP's merges.
"""

from __future__ import annotations

import functools
import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from backend.families import SD, SDXL, Family
from sdtex_contract.protocol import MODEL_LOAD_FAILED, ProtocolError

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
MERGES_FILE = "clip-merges.txt.gz"
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # every SD 1.x/2.x/XL U-Net's conv_in
HEADER_MAX = 100 * 2**20  # bytes of safetensors JSON header; real SDXL files have ~0.2 MB


@dataclass(frozen=True)
class CheckpointKind:
    """What a single file is, by diffusers' model type, and how to load it."""

    model_type: str  # infer_diffusers_model_type's name: "v1", "v2", "xl_base"
    family: Family
    base: str  # "sd1" | "sd2" | "sdxl": what the add-on's defaults table is keyed by
    config: str  # folder under backend/configs/
    label: str  # for people

    @property
    def config_dir(self) -> Path:
        return CONFIG_ROOT / self.config


KINDS: dict[str, CheckpointKind] = {
    kind.model_type: kind
    for kind in (
        CheckpointKind("v1", SD, "sd1", "sd15", "Stable Diffusion 1.x"),
        CheckpointKind("v2", SD, "sd2", "sd21", "Stable Diffusion 2.x (768 px, v-prediction)"),
        CheckpointKind("xl_base", SDXL, "sdxl", "sdxl", "Stable Diffusion XL"),
    )
}
# Types diffusers knows that this project cannot run from a single file, with what to do instead.
UNSUPPORTED_ADVICE = {
    "inpainting": "an SD 1.x inpainting checkpoint: use its diffusers folder",
    "inpainting_v2": "an SD 2.x inpainting checkpoint: use its diffusers folder",
    "xl_inpaint": "an SDXL inpainting checkpoint: use its diffusers folder",
    "xl_refiner": "the SDXL refiner, which only refines SDXL images (img2img); pick an SDXL base model",
    "upscale": "the SD x4 upscaler: use its diffusers folder as the upscale task's upscaler_model",
}


class _Shape:
    """A tensor stand-in with only a shape: enough for infer_diffusers_model_type, without reading weights."""

    __slots__ = ("shape",)

    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)


def _failed(path: Path, why: str) -> ProtocolError:
    return ProtocolError(MODEL_LOAD_FAILED, f"{path.name} {why}", {"param": "model", "value": str(path)})


def read_header(path: str | Path) -> dict[str, _Shape]:
    """Tensor names and shapes of a .safetensors file, from its JSON header (the weights are not read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            (size,) = struct.unpack("<Q", size_bytes) if len(size_bytes) == 8 else (0,)
            if not 2 <= size <= HEADER_MAX:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return {name: _Shape(info["shape"]) for name, info in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # e.g. a pickle checkpoint renamed to .safetensors
        raise _failed(path, f"is not a valid .safetensors file ({exc}); was it renamed from .ckpt?") from None


def model_type_of(checkpoint: dict[str, Any]) -> str:
    """diffusers' name for what a state dict (or a dict of shape stand-ins) holds."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        return infer_diffusers_model_type(checkpoint)
    except Exception as exc:  # a branch reading tensor values, or an unexpected layout
        return f"unknown ({type(exc).__name__})"


def checkpoint_kind(path: str | Path, use_safetensors: bool = True) -> CheckpointKind:
    """What a single-file checkpoint is; ProtocolError(MODEL_LOAD_FAILED) naming what it is when not loadable.

    A pickle checkpoint (use_safetensors False, only with allow_pickle) has no readable header: it is loaded to look.
    """
    path = Path(path)
    if use_safetensors:
        checkpoint: dict = read_header(path)
    else:
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        try:
            checkpoint = load_single_file_checkpoint(str(path))
        except Exception as exc:
            raise _failed(path, f"cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None
    model_type = model_type_of(checkpoint)
    kind = KINDS.get(model_type)
    if kind is None:
        what = UNSUPPORTED_ADVICE.get(model_type, f"a {model_type} checkpoint")
        raise _failed(path, f"is {what}; single-file checkpoints can be SD 1.x, SD 2.x or SDXL")
    if UNET_KEY not in checkpoint:  # "v1" is also diffusers' answer for anything it does not recognise
        raise _failed(
            path,
            "has no Stable Diffusion U-Net in the original layout: not a whole checkpoint "
            "(a LoRA, a VAE, an embedding or one diffusers component?)",
        )
    return kind


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's BPE vocabulary and merges, built from the shipped merges the way CLIP builds them."""
    lines = gzip.decompress((CONFIG_ROOT / MERGES_FILE).read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split(" ")) for line in lines[1:] if line)  # line 0: "#version: 0.2"
    # GPT-2's byte encoder, in its order: printable bytes stand for themselves, the others get characters from 256 up.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [byte for byte in range(256) if byte not in keep]
    chars = [chr(byte) for byte in keep] + [chr(256 + n) for n in range(len(others))]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer from a config folder's tokenizer_config.json and the shipped vocabulary."""
    from transformers import CLIPTokenizer

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    keys = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "do_lower_case")
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **{k: config[k] for k in keys if k in config})


def tokenizers(config_dir: Path) -> dict[str, Any]:
    """Every tokenizer a config folder's pipeline needs, by component name."""
    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    return {
        name: clip_tokenizer(config_dir / name)
        for name, value in index.items()
        if isinstance(value, list) and value[1:] == ["CLIPTokenizer"]
    }


def load(path: str | Path, kind: CheckpointKind, config_dir: Path | None = None, **kwargs) -> DiffusionPipeline:
    """The family's txt2img pipeline from a single file, offline: configs and tokenizers come from `config_dir`
    (default: the shipped folder for the kind). kwargs go to from_single_file (dtype, safety_checker, ...)."""
    folder = config_dir or kind.config_dir
    return kind.family.txt2img.from_single_file(
        str(path), config=str(folder), local_files_only=True, **tokenizers(folder), **kwargs
    )
