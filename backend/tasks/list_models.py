"""The list_models task: diffusers pipelines in the Hugging Face cache (huggingface_hub's cache scan) and the
diffusers folders and .safetensors checkpoints of a models folder, each with its family, training size and the
settings that suit it. Reads configs and file headers only; no weights are loaded."""

from __future__ import annotations

import time
from pathlib import Path

from backend import downloads, loras
from backend.context import JobContext
from backend.registry import runs
from sdtex_contract.protocol import ListModelsParams, ModelList, invalid


@runs("list_models")
def run(ctx: JobContext, params: ListModelsParams, cache_dir: Path | None = None) -> ModelList:
    start = time.perf_counter()
    # 1. Check inputs
    models_dir = Path(params.models_dir).expanduser() if params.models_dir else None
    if models_dir is not None and not (models_dir.is_absolute() and models_dir.is_dir()):
        raise invalid("models_dir", "an absolute path of an existing folder, or empty", params.models_dir)

    # 2. Scan
    entries, scanned = [], ""
    if params.include_cache:
        from huggingface_hub import constants

        scanned = str(cache_dir or constants.HF_HUB_CACHE)  # read now: HF_HUB_CACHE / HF_HOME
        entries += downloads.cached_models(Path(scanned))
    ctx.check_cancelled()
    if models_dir is not None:
        entries += downloads.folder_models(models_dir)
    return ModelList(
        models=downloads.entries_as_dicts(entries),
        cache_dir=scanned,
        models_dir=str(models_dir or ""),
        seconds=time.perf_counter() - start,
        loras=loras.list_loras(models_dir) if models_dir is not None else [],
    )
