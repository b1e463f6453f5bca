"""Find, check and load Stable Diffusion pipelines; keep one warm, with its task variants sharing its weights.

A model is a hub id, a local diffusers folder or a single-file `.safetensors` checkpoint. Pickle
checkpoints (.ckpt/.pt/.pth/.bin) can run arbitrary code when loaded, so they are refused unless the
request sets allow_pickle. Remote code and custom pipelines are never enabled.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from backend import loras, single_file, vae_tiles
from backend.families import FAMILIES, Family, family_of, family_of_class_name
from backend.memory_plan import plan_memory
from sdtex_contract.protocol import (
    INVALID_PARAMS,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    PICKLE_SUFFIXES,
    UNSAFE_CHECKPOINT,
    GenerateParams,
    ProtocolError,
    is_hub_id,
)

log = logging.getLogger(__name__)

PIPELINE_CLASSES = {family.txt2img.__name__: family.txt2img for family in FAMILIES.values()}
# The names diffusers and transformers load a component's safetensors weights from (variant and shards
# included); any other .safetensors file in a component folder is not its weights and makes nothing safe.
SAFE_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(\.\w+)?(-\d{5}-of-\d{5})?\.safetensors")
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "folder" | "single_file"
    location: str  # hub id or absolute path
    use_safetensors: bool


@dataclass(frozen=True)
class ModelKey:
    """What makes a loaded pipeline reusable. Slicing and VAE tiling are toggled per request instead."""

    source: ModelSource
    device: str
    dtype: str
    cpu_offload: bool
    channels_last: bool = False  # resolved: "auto" is on with CUDA
    compile: bool = False


@dataclass
class LoadedModel:
    pipe: DiffusionPipeline  # the txt2img pipeline; run_txt2img swaps in a fresh scheduler per request
    key: ModelKey
    device: torch.device  # pipe._execution_device, read once: each read walks every module (ms per request)
    attention_slicing: bool = False  # toggling walks the whole U-Net, so it happens only on a change
    memory_advice: str = ""  # on CUDA, backend/memory_plan.py's plan for the free VRAM at load (logged)
    _variants: dict[str, DiffusionPipeline] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> Family:
        return family_of(self.pipe)

    @property
    def dtype_name(self) -> str:
        """The precision the weights really have (diffusers < 0.40 ignored `dtype=` and loaded fp32)."""
        return DTYPE_NAMES.get(self.pipe.unet.dtype, str(self.pipe.unet.dtype).removeprefix("torch."))

    def pipeline(self, task: str) -> DiffusionPipeline:
        """The family's pipeline for a task, sharing the warm weights (built once, then cached)."""
        if task == "txt2img":
            return self.pipe
        if task not in self._variants:
            family = self.family
            if task not in family.pipelines:
                raise ValueError(f"no {task!r} pipeline for {family.name} models; tasks: {', '.join(family.pipelines)}")
            # from_pipe casts every shared module to its dtype (fp32 unless told): keep the loaded one.
            cls = family.pipelines[task]
            variant = cls.from_pipe(self.pipe, dtype=self.pipe.unet.dtype, **family.pipeline_kwargs)
            variant.set_progress_bar_config(disable=True)
            self._variants[task] = variant
        return self._variants[task]


def _not_found(model: str, why: str) -> ProtocolError:
    return ProtocolError(
        MODEL_NOT_FOUND,
        f"model {model!r} not found: {why}. Download it first with `hf download <id>` "
        "(older: `huggingface-cli download <id>`), or give a local diffusers folder or a .safetensors file",
        {"param": "model", "value": model},
    )


def _unsafe(model: str, what: str) -> ProtocolError:
    return ProtocolError(
        UNSAFE_CHECKPOINT,
        f"{what} is a pickle checkpoint, which can run code when loaded; convert it to .safetensors "
        "or set allow_pickle if you trust its source",
        {"param": "model", "value": model},
    )


def _safe_weights(component: Path) -> list[str]:
    """The component's safetensors weight files by the names the loaders read (not any .safetensors file)."""
    return [f.name for f in component.iterdir() if SAFE_WEIGHTS.fullmatch(f.name)]


def _pickle_only_components(folder: Path) -> list[str]:
    """Components of a diffusers folder whose weights exist only in a pickle format."""
    return sorted(
        part.name
        for part in folder.iterdir()
        if part.is_dir()
        and not _safe_weights(part)
        and any(f.suffix.lower() in PICKLE_SUFFIXES for f in part.iterdir())
    )


def locate(model: str, allow_pickle: bool = False) -> ModelSource:
    """Classify a model string without loading anything; refuse missing paths and unsafe checkpoints."""
    path = Path(model).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. a name longer than the file system allows: not a path that can exist
        raise _not_found(model, exc.strerror or str(exc)) from None
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ProtocolError(
                MODEL_LOAD_FAILED,
                f"{path} is not a diffusers model folder (no model_index.json)",
                {"param": "model", "value": model},
            )
        pickled = _pickle_only_components(path)
        if pickled and not allow_pickle:
            raise _unsafe(model, f"{path} ({', '.join(pickled)}: only .bin/.pt weights)")
        return ModelSource("folder", str(path.resolve()), not pickled)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _unsafe(model, path.name)
            return ModelSource("single_file", str(path.resolve()), False)
        if suffix != ".safetensors":
            raise ProtocolError(
                MODEL_LOAD_FAILED,
                f"{path.name}: a single-file model must be a .safetensors checkpoint",
                {"param": "model", "value": model},
            )
        return ModelSource("single_file", str(path.resolve()), True)
    if is_hub_id(model):
        snapshot = hub_snapshot(model)  # a cached copy is checked like a folder: loading it must not fail later
        pickled = _pickle_only_components(snapshot) if snapshot else []
        if pickled and not allow_pickle:
            raise _unsafe(model, f"{model} ({', '.join(pickled)}: only .bin/.pt weights in the cache)")
        return ModelSource("hub", model, not allow_pickle)
    raise _not_found(model, "no such file or folder, and not a hub id like `owner/name`")


def single_file_kind(source: ModelSource) -> single_file.CheckpointKind:
    """What a single-file checkpoint is, by diffusers' own checkpoint inference (backend/single_file.py)."""
    return single_file.checkpoint_kind(source.location, source.use_safetensors)


def single_file_family(source: ModelSource) -> Family:
    return single_file_kind(source).family


def weights_variant(folder: Path, dtype: str) -> str | None:
    """`fp16` when a diffusers folder's weights must or should load from their fp16 files: some component has
    only `*.fp16.safetensors` (what download_model fetches), or both exist and half precision was asked for
    (half the bytes to read). None loads the full-precision files."""
    has_fp16 = has_full = False
    for component in (part for part in folder.iterdir() if part.is_dir()):
        names = _safe_weights(component)
        fp16 = any(".fp16." in name or ".fp16-" in name for name in names)
        full = any(".fp16" not in name for name in names)
        if fp16 and not full:
            return "fp16"
        has_fp16, has_full = has_fp16 or fp16, has_full or full
    return "fp16" if has_fp16 and dtype != "fp32" else None


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (its model_index.json's folder), or None when not cached."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _folder_family(model_index: dict, model: str) -> Family:
    name = model_index.get("_class_name")
    family = family_of_class_name(name)
    if family is None:
        raise ProtocolError(
            MODEL_LOAD_FAILED,
            f"{model} is a {name}; supported pipelines are {', '.join(PIPELINE_CLASSES)}",
            {"param": "model", "value": model},
        )
    return family


def _hub_model_index(repo_id: str) -> dict:
    # hf_hub_download honours HF_HUB_OFFLINE and answers from the local cache when it can.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text(encoding="utf-8"))
    except (LocalEntryNotFoundError, HFValidationError) as exc:  # LocalEntryNotFoundError is an EntryNotFoundError
        raise _not_found(repo_id, f"not in the local cache and not downloadable ({type(exc).__name__})") from None
    except EntryNotFoundError:
        raise _not_found(repo_id, "the repository has no model_index.json (not a diffusers model)") from None
    except Exception as exc:  # RepositoryNotFoundError, GatedRepoError, network errors
        raise _not_found(repo_id, f"{type(exc).__name__}: {exc}") from None


def available_devices() -> list[str]:
    """Usable devices, best first."""
    devices = ["cpu"]
    if torch.backends.mps.is_available():
        devices.insert(0, "mps")
    if torch.cuda.is_available():
        devices.insert(0, "cuda")
    return devices


def pick_device(device: str) -> str:
    """'auto' -> cuda, then mps, then cpu; an explicit device must exist."""
    available = available_devices()
    if device == "auto":
        return available[0]
    if device not in available:
        raise ProtocolError(
            INVALID_PARAMS,
            f"device {device!r} is not available here; available: {', '.join(available)}",
            {"param": "device", "value": device, "accepted": available},
        )
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "fp32" if device == "cpu" else "fp16"
    return dtype


def load_pipeline(
    source: ModelSource,
    device: str,
    dtype: str,
    cpu_offload: bool,
    *,
    channels_last: bool = False,
    compile: bool = False,
) -> DiffusionPipeline:
    """Load and place a family's txt2img pipeline, with the family's pipeline_kwargs (no safety checker:
    on textures it mostly blacks out harmless images, the top complaint about SD add-ons, and the artist
    is the operator; no SDXL watermark)."""
    kwargs: dict = {"dtype": TORCH_DTYPES[dtype]}
    kind = None
    if source.kind == "single_file":
        kind = single_file_kind(source)
        family = kind.family
    else:
        if source.kind == "folder":
            folder: Path | None = Path(source.location)
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        else:
            index = _hub_model_index(source.location)
            folder = hub_snapshot(source.location)
        family = _folder_family(index, source.location)
        kwargs["use_safetensors"] = source.use_safetensors or None  # None: safetensors when present, else .bin
        if folder is not None and source.use_safetensors:
            kwargs["variant"] = weights_variant(folder, dtype)
    kwargs.update(family.pipeline_kwargs)
    try:
        if kind is not None:  # offline: shipped configs, diffusers' own conversion of the original layout
            pipe = single_file.load(source.location, kind, **kwargs)
        else:
            pipe = family.txt2img.from_pretrained(source.location, **kwargs)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:
        raise ProtocolError(
            MODEL_LOAD_FAILED,
            f"could not load {source.location}: {type(exc).__name__}: {exc}",
            {"param": "model", "value": source.location},
        ) from exc
    place(pipe, device, cpu_offload, channels_last=channels_last, compile=compile)
    return pipe


def place(
    pipe: DiffusionPipeline, device: str, cpu_offload: bool, *, channels_last: bool = False, compile: bool = False
) -> None:
    """Put a loaded pipeline on its device with the GPU options of its ModelKey (the GPU benchmark calls this too).
    Attention needs nothing here: diffusers' default processor with torch 2 is AttnProcessor2_0 (SDPA)."""
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if channels_last:  # only the layout changes; the U-Net takes and returns the same tensors
        pipe.unet.to(memory_format=torch.channels_last)
    if compile:
        # Inductor's compiled kernels go to the worker's cache: a restarted worker reuses them.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
        # In place (the module keeps its class, so family_of, from_pipe and the patches still see a U-Net);
        # no CUDA graphs: they would pin the memory of every size and sampler seen.
        pipe.unet.compile(mode="max-autotune-no-cudagraphs")
    pipe.set_progress_bar_config(disable=True)


def inductor_cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sd-textures" / "inductor"


def compile_problem(device: str) -> str | None:
    """Why `compile` cannot run for this device and torch, or None when it can."""
    if device != "cuda":
        return f"compile needs a CUDA device, this request runs on {device}"
    from torch.utils._triton import has_triton

    if not has_triton():
        return "compile needs Triton (torch.compile's GPU compiler), which this torch install cannot use"
    return None


def configure(model: LoadedModel, params: GenerateParams) -> None:
    """Per-request memory options, toggled on the loaded pipeline only when they change."""
    pipe = model.pipe
    if params.attention_slicing != model.attention_slicing:
        if params.attention_slicing:
            pipe.enable_attention_slicing()
        else:
            pipe.disable_attention_slicing()
        model.attention_slicing = params.attention_slicing
    # Decoding tiles exactly (backend/vae_tiles.py) keeps seamless; diffusers' tiles, each wrapping on its own,
    # would not, so they serve only the encoder (large img2img inputs) and only while seamless is "none".
    vae_tiles.set_tiled(pipe.vae, params.vae_tiling)
    if params.vae_tiling and params.seamless == "none":
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def model_key(model: str, params: GenerateParams) -> ModelKey:
    """What a loaded pipeline of `model` is kept warm by, for these device and memory settings; refuses
    missing or unsafe models and impossible placements before anything loads."""
    source = locate(model, params.allow_pickle)
    device = pick_device(params.device)
    if params.cpu_offload and device != "cuda":
        raise ProtocolError(
            INVALID_PARAMS,
            f"cpu_offload needs a CUDA device, this request runs on {device}",
            {"param": "cpu_offload", "value": True},
        )
    if params.compile and (problem := compile_problem(device)):
        raise ProtocolError(
            INVALID_PARAMS, f"{problem}; turn compile off", {"param": "compile", "value": True, "accepted": [False]}
        )
    channels_last = params.channels_last == "on" or (params.channels_last == "auto" and device == "cuda")
    dtype = pick_dtype(params.dtype, device)
    return ModelKey(source, device, dtype, params.cpu_offload, channels_last, params.compile)


class WarmSlot:
    """Keeps one loaded pipeline (anything with a `key`) warm: a request for another key releases it first."""

    def __init__(self) -> None:
        self.loaded: Any = None

    def _warm(self, key: ModelKey, load: Callable[[], Any]) -> float:
        """Make `load()` the warm one unless it already has `key`; the seconds spent loading (0 when warm)."""
        if self.loaded is not None and self.loaded.key == key:
            return 0.0
        self.release()
        start = time.perf_counter()
        self.loaded = load()
        return time.perf_counter() - start

    def release(self) -> None:
        if self.loaded is None:
            return
        cuda = self.loaded.key.device == "cuda"
        self.loaded = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


class ModelManager(WarmSlot):
    """Keeps one pipeline warm; asking for another model, device, dtype or offload mode swaps it."""

    loaded: LoadedModel | None

    def get(self, params: GenerateParams) -> tuple[LoadedModel, float]:
        """The pipeline for these params and the seconds spent loading it (0 when it was warm)."""
        key = model_key(params.model, params)
        lora_files = loras.locate(params.loras, params.allow_pickle)  # missing or unsafe files: before loading

        def load() -> LoadedModel:
            log.info("loading %s on %s (%s)", key.source.location, key.device, key.dtype)
            free = torch.cuda.mem_get_info()[0] if key.device == "cuda" else 0
            options = {"channels_last": key.channels_last, "compile": key.compile}
            pipe = load_pipeline(key.source, key.device, key.dtype, key.cpu_offload, **options)
            loaded = LoadedModel(pipe, key, pipe._execution_device)
            if free:
                loaded.memory_advice = memory_advice(pipe, free)
                log.info("%s", loaded.memory_advice)
            return loaded

        seconds = self._warm(key, load)
        configure(self.loaded, params)
        loras.apply(self.loaded.pipe, lora_files)  # also when none: switches off the last request's
        return self.loaded, seconds

    @property
    def loaded_name(self) -> str | None:
        return self.loaded.key.source.location if self.loaded else None


def memory_advice(pipe: DiffusionPipeline, free_bytes: int) -> str:
    """backend/memory_plan.py's plan for this pipeline at its family's native size, given the VRAM free before it
    loaded, as one line of advice."""
    family = family_of(pipe)
    weights = 2 * sum(p.numel() for module in pipe.components.values() if isinstance(module, torch.nn.Module)
                      for p in module.parameters())  # fmt: skip
    size = family.default_size
    plan = plan_memory(free_bytes, weights, family.name, size, size, bf16_supported=torch.cuda.is_bf16_supported())
    return plan.advice()


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return os.fspath(constants.HF_HUB_CACHE)
