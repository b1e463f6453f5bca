"""LoRAs on the warm model: located and checked before the model loads, loaded with diffusers' own
`load_lora_weights` (which also converts the kohya / A1111 key layout civitai files use), then switched per
request with `set_adapters` and per-adapter weights, without touching the base weights.

Adapters are named after the file's sha256 (`sdtex_<16 hex>`), so the same file under two names loads once
and an edited file loads again. They live in the U-Net and text encoders, which the task variants built with
`from_pipe` share: the state is kept per U-Net, and every request sets it (a request naming no LoRA disables
them all), so nothing one request asked for leaks into the next, whatever pipeline variant it runs. The last
KEEP_LOADED adapters stay loaded (switching back costs nothing); older ones are deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
from diffusers import DiffusionPipeline
from torch import nn
from transformers.utils import logging as transformers_logging

from sdtex_contract.protocol import (
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    PICKLE_SUFFIXES,
    UNSAFE_CHECKPOINT,
    ProtocolError,
    is_hub_id,
)

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name inside a LoRA folder or hub repository
KEEP_LOADED = 8  # inactive adapters kept in memory for quick switching, most recently used first


@dataclass(frozen=True)
class LoraFile:
    """One requested LoRA, located on disk."""

    param: str  # how errors name it: "loras[0].model"
    path: str
    adapter: str  # "sdtex_" + the first 16 hex digits of the file's sha256
    weight: float


@dataclass
class _Adapters:
    """What is loaded into one U-Net (and its text encoders): adapter names, least recently used first."""

    loaded: OrderedDict[str, str] = field(default_factory=OrderedDict)  # adapter -> file it came from


_STATE: weakref.WeakKeyDictionary[nn.Module, _Adapters] = weakref.WeakKeyDictionary()
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 hex


def _error(code: str, param: str, value: str, message: str) -> ProtocolError:
    return ProtocolError(code, f"{param}: {message}", {"param": param, "value": value})


def file_digest(path: str) -> str:
    """The file's sha256, remembered while its size and modification time stay the same."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(2**20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _folder_file(folder: Path, param: str, value: str) -> Path:
    """The LoRA file in a folder: diffusers' pytorch_lora_weights.safetensors, else the only .safetensors."""
    if (folder / LORA_WEIGHT_NAME).is_file():
        return folder / LORA_WEIGHT_NAME
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise _error(
            MODEL_NOT_FOUND,
            param,
            value,
            f"{folder} must hold one .safetensors LoRA file (found: {found}); name the file",
        )
    return files[0]


def _hub_file(repo_id: str, param: str) -> Path:
    """A hub LoRA repository's weights file (cached, or downloaded when the hub can be reached)."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, LORA_WEIGHT_NAME))
    except Exception as first:  # not this file name (list the repository), or no hub here
        try:
            names = [n for n in HfApi().list_repo_files(repo_id) if n.endswith(".safetensors")]
        except Exception:
            raise _error(
                MODEL_NOT_FOUND, param, repo_id, f"no such file or folder, and the hub has no {repo_id} ({first})"
            ) from None
        if len(names) != 1:
            raise _error(
                MODEL_NOT_FOUND, param, repo_id,
                f"{repo_id} holds {len(names)} .safetensors files ({', '.join(names)[:200]}): download the one "
                "you want and give its path",
            ) from None  # fmt: skip
        return Path(hf_hub_download(repo_id, names[0]))


def locate(entries: list[dict], allow_pickle: bool = False) -> list[LoraFile]:
    """The requested LoRAs (validated `loras` entries: model, weight) as files, refusing missing files and
    pickle files (unless allow_pickle) before anything expensive happens."""
    located = []
    for i, entry in enumerate(entries):
        param, value = f"loras[{i}].model", entry["model"]
        path = Path(value).expanduser()
        if path.is_dir():
            path = _folder_file(path, param, value)
        elif not path.is_file():
            if not is_hub_id(value):
                raise _error(MODEL_NOT_FOUND, param, value, "no such file or folder, and not a hub id like owner/name")
            path = _hub_file(value, param)
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise _error(
                UNSAFE_CHECKPOINT, param, value,
                f"{path.name} is a pickle file, which can run code when loaded; use a .safetensors LoRA "
                "or set allow_pickle if you trust its source",
            )  # fmt: skip
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise _error(MODEL_LOAD_FAILED, param, value, f"{path.name}: a LoRA must be a .safetensors file")
        path = path.resolve()
        adapter = "sdtex_" + file_digest(str(path))[:16]
        located.append(LoraFile(param, str(path), adapter, entry["weight"]))
    return located


def _adapters_in(pipe: DiffusionPipeline) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _load(pipe: DiffusionPipeline, lora: LoraFile) -> None:
    """diffusers' own loading (it converts kohya / A1111 keys). A file none of whose keys fit this model
    (another family's LoRA, or not a LoRA) loads nothing without an error there: refused here."""
    verbosity = transformers_logging.get_verbosity()
    # transformers reports every base weight of a text encoder as MISSING when only an adapter loads (a
    # screenful per LoRA): errors only while loading.
    transformers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(lora.path, adapter_name=lora.adapter)
    except Exception as exc:
        if lora.adapter in _adapters_in(pipe):
            pipe.delete_adapters(lora.adapter)
        raise _error(
            MODEL_LOAD_FAILED, lora.param, lora.path,
            f"could not load {Path(lora.path).name} as a LoRA of this model ({type(exc).__name__}: {str(exc)[:300]}); "
            "is it a LoRA for another model family?",
        ) from exc  # fmt: skip
    finally:
        transformers_logging.set_verbosity(verbosity)
    if lora.adapter not in _adapters_in(pipe):
        raise _error(
            MODEL_LOAD_FAILED, lora.param, lora.path,
            f"{Path(lora.path).name} matches no layer of this model: a LoRA for another model family, or not a LoRA",
        )  # fmt: skip


def apply(pipe: DiffusionPipeline, loras: list[LoraFile]) -> None:
    """Make exactly these LoRAs, with their weights, active on the pipeline's U-Net and text encoders (and so on
    every variant sharing them). The same file twice adds its weights, as loading it twice would."""
    state = _STATE.setdefault(pipe.unet, _Adapters())
    weights: dict[str, float] = {}
    for lora in loras:
        if lora.adapter not in state.loaded:
            log.info("loading LoRA %s", lora.path)
            _load(pipe, lora)
        state.loaded[lora.adapter] = lora.path
        state.loaded.move_to_end(lora.adapter)
        weights[lora.adapter] = weights.get(lora.adapter, 0.0) + lora.weight
    if not state.loaded:
        return  # never had one: nothing to switch off
    if not weights:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    stale = [name for name in state.loaded if name not in weights][
        : max(0, len(state.loaded) - len(weights) - KEEP_LOADED)
    ]
    if stale:
        pipe.delete_adapters(stale)
        for name in stale:
            del state.loaded[name]


def active(pipe: DiffusionPipeline) -> dict[str, str]:
    """Loaded adapters of the pipeline's U-Net -> their files (for tests and logs)."""
    state = _STATE.get(pipe.unet)
    return dict(state.loaded) if state else {}


# --- listing -----------------------------------------------------------------------------------------------


def lora_base(path: Path) -> str:
    """ "sd1" | "sdxl" | "" from a LoRA file's key names (header only): SDXL LoRAs address a second text
    encoder or a second transformer block (SD 1.x/2.x have one per attention); "" when it is not a LoRA."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if not any("lora" in key for key in keys):
        return ""
    sdxl = ("text_encoder_2.", "lora_te2_", "transformer_blocks.1.", "transformer_blocks_1_")
    return "sdxl" if any(marker in key for key in keys for marker in sdxl) else "sd1"


def list_loras(folder: Path) -> list[dict]:
    """The LoRA .safetensors files in a folder and one level down: {model, name, size, base}."""
    found = []
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")], key=lambda p: str(p).lower()):
        try:
            base = lora_base(path)
            if base:
                found.append({"model": str(path), "name": path.stem, "size": path.stat().st_size, "base": base})
        except Exception:  # unreadable or not safetensors: not a LoRA we can offer
            continue
    return found
