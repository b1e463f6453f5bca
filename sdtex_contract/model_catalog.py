"""Which settings suit a model, and whether a model is on disk: data and checks the panel reads.

Stdlib only and Blender-free, so the panel can answer without the backend running (or installed):
- `defaults_for(model, base, native_size)`: width/height, steps, guidance and sampler that suit a model, from its
  family (SDXL: 1024 px) and, for distilled models, its name (Turbo: 1-4 steps, guidance 0; LCM: its sampler,
  4-8 steps). The backend's list_models attaches the same dict to each entry.
- `local_status(model)`: "file" / "folder" / "cached" / "missing" / "invalid", from the file system and the Hugging
  Face cache's layout, so Generate can say "the model is not on disk" and early start can skip warming it. A
  preview decoder (TAESD: an AutoencoderTiny folder, config.json and its weights, no model_index.json) counts too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .params import HUB_ID

BASES = ("sd1", "sd2", "sdxl")
PREVIEW_DECODER_CLASS = "AutoencoderTiny"  # TAESD's class in diffusers
PREVIEW_DECODER_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class ModelDefaults:
    """Settings that suit a model; the panel fills them in when the model is picked."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str  # a protocol.SCHEDULERS name
    steps_min: int = 1  # the range worth offering for steps
    steps_max: int = 150
    note: str = ""  # one sentence for people: why these values

    def to_dict(self) -> dict:
        return asdict(self)


# Per family: the resolution it was trained at and the pipeline's own guidance.
BASE_DEFAULTS: dict[str, ModelDefaults] = {
    "sd1": ModelDefaults(512, 512, 25, 7.5, "euler_a", note="Stable Diffusion 1.x: trained at 512 x 512."),
    "sd2": ModelDefaults(768, 768, 25, 7.5, "euler_a", note="Stable Diffusion 2.x: trained at 768 x 768."),
    "sdxl": ModelDefaults(1024, 1024, 25, 5.0, "euler_a", note="SDXL: trained at 1024 x 1024."),
}


@dataclass(frozen=True)
class NameRule:
    """Settings for distilled models, told by their name (hub id or file name): they need few steps."""

    pattern: str  # a regular expression, searched case-insensitively in the name
    steps: int
    guidance_scale: float
    scheduler: str
    steps_min: int
    steps_max: int
    note: str


NAME_RULES: tuple[NameRule, ...] = (
    NameRule(r"turbo", 1, 0.0, "euler_a", 1, 4, "Turbo model: 1 to 4 steps without guidance."),
    NameRule(r"lcm|latent-consistency", 4, 1.5, "lcm", 4, 8, "LCM model: its own sampler, 4 to 8 steps."),
    NameRule(r"lightning", 4, 0.0, "euler", 2, 8, "Lightning model: 2 to 8 steps without guidance."),
    NameRule(r"hyper-?sd", 8, 0.0, "euler", 1, 8, "Hyper-SD model: 1 to 8 steps without guidance."),
)  # fmt: skip


def guess_base(model: str) -> str:
    """The family a model's name suggests, when nothing better is known (a hub id not downloaded yet)."""
    name = model.lower()
    if re.search(r"xl|sdxl", name):
        return "sdxl"
    if re.search(r"stable-diffusion-2|sd-?2|v2-1|768-v", name):
        return "sd2"
    return "sd1"


def short_name(model: str) -> str:
    """A hub id as it is; a folder or file by its last part."""
    model = model.strip()
    return model if HUB_ID.match(model) else Path(model.rstrip("/\\")).name


def defaults_for(model: str, base: str = "", native_size: int = 0) -> ModelDefaults:
    """Settings that suit `model` (hub id, folder or file): its family's, the training size when known (SDXL-Turbo
    was trained at 512), and a distilled model's steps, guidance and sampler."""
    chosen = BASE_DEFAULTS.get(base) or BASE_DEFAULTS[guess_base(model)]
    if native_size:
        chosen = replace(chosen, width=native_size, height=native_size)
    name = short_name(model)
    for rule in NAME_RULES:
        if re.search(rule.pattern, name, re.IGNORECASE):
            return replace(
                chosen,
                steps=rule.steps,
                guidance_scale=rule.guidance_scale,
                scheduler=rule.scheduler,
                steps_min=rule.steps_min,
                steps_max=rule.steps_max,
                note=rule.note,
            )
    return chosen


# --- on disk? -----------------------------------------------------------------------------------------------


def hf_cache_dir(environ: dict | None = None) -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "huggingface" / "hub"


def cached_snapshot(repo_id: str, cache_dir: Path | None = None, revision: str = "main") -> Path | None:
    """The cache's snapshot folder of a hub model at `revision` when its model_index.json is there, else None."""
    repo = (cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if (snapshot / "model_index.json").is_file() or is_preview_decoder(snapshot) else None


def is_preview_decoder(folder: Path) -> bool:
    """An AutoencoderTiny folder (TAESD): a config.json naming the class, and no pipeline's model_index.json."""
    if (folder / "model_index.json").is_file():
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == PREVIEW_DECODER_CLASS


def local_models(cache_dir: Path | None = None, folders: tuple[Path, ...] = ()) -> list[str]:
    """The models on disk, as a model setting names them: hub ids complete in the cache, then in each folder
    its diffusers model folders and single-file checkpoints (.safetensors), sorted by name."""
    cache = cache_dir or hf_cache_dir()
    found = []
    try:
        repos = sorted(p.name for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError:
        repos = []
    for name in repos:
        repo_id = name[len("models--") :].replace("--", "/", 1)
        if local_status(repo_id, cache) == "cached":
            found.append(repo_id)
    for folder in folders:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.suffix == ".safetensors" or local_status(str(entry)) == "folder":
                found.append(str(entry))
    return found


WEIGHT_SUFFIXES = (".safetensors", ".bin")
NOT_WEIGHTS = ("Scheduler", "Tokenizer", "TokenizerFast", "Processor", "FeatureExtractor")  # class name endings


def missing_weights(folder: Path) -> list[str]:
    """The components of a diffusers folder (or cache snapshot) that need weights and have none on disk: what an
    interrupted download leaves. The safety checker is never loaded, so it never counts."""
    if is_preview_decoder(folder):
        return [] if (folder / PREVIEW_DECODER_WEIGHTS).is_file() else [PREVIEW_DECODER_WEIGHTS]
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["model_index.json"]
    missing = []
    for name, value in index.items() if isinstance(index, dict) else ():
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            continue
        if name == "safety_checker" or value[1].endswith(NOT_WEIGHTS):
            continue
        component = folder / name
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in (component.iterdir() if component.is_dir() else ())):
            missing.append(name)
    return missing


def local_status(model: str, cache_dir: Path | None = None) -> str:
    """Where a model setting points, without loading anything:
    "file" (a .safetensors/.ckpt file), "folder" (a diffusers folder), "cached" (a hub id in the cache),
    "partial" (a folder or cached model with some weights missing: an interrupted download; download again),
    "missing" (a hub id not downloaded: offer Download, or a path that does not exist), "invalid" (empty, or a
    folder that is neither a pipeline's, with a model_index.json, nor a preview decoder's)."""
    model = model.strip()
    if not model:
        return "invalid"
    path = Path(model).expanduser()
    try:
        if path.is_file():
            return "file"
        if path.is_dir():
            if not (path / "model_index.json").is_file() and not is_preview_decoder(path):
                return "invalid"
            return "partial" if missing_weights(path) else "folder"
        if HUB_ID.match(model) and not model.lower().endswith((".safetensors", ".ckpt")):
            snapshot = cached_snapshot(model, cache_dir)
            if snapshot is None:
                return "missing"
            return "partial" if missing_weights(snapshot) else "cached"
    except OSError:
        return "invalid"
    return "missing"
