"""The download_model task: a hub pipeline's needed files into the Hugging Face cache (or a folder), with progress.

Events: `status` "downloading", then `download` (DownloadProgress: bytes and files done, speed) and `progress`
(step/total counting the same bytes, so generic job views show a bar) about four times a second. Cancel stops
within one chunk; what was fetched stays and the next download resumes it. Free space is checked first.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from backend import downloads
from backend.context import JobContext
from backend.families import family_of_class_name
from backend.registry import runs
from sdtex_contract.params import HUB_ID
from sdtex_contract.protocol import (
    EVENT_DOWNLOAD,
    DownloadModelParams,
    DownloadProgress,
    DownloadResult,
    invalid,
)


@runs("download_model")
def run(ctx: JobContext, params: DownloadModelParams, endpoint: str | None = None) -> DownloadResult:
    start = time.perf_counter()
    # 1. Check inputs
    if not HUB_ID.match(params.model):
        raise invalid("model", "a hub id like owner/name", params.model)
    local_dir = Path(params.local_dir).expanduser() if params.local_dir else None
    if local_dir is not None and not local_dir.is_absolute():
        raise invalid("local_dir", "an absolute folder, or empty for the Hugging Face cache", params.local_dir)
    ctx.stage("downloading")

    # 2. Ask the hub which files the model needs (no weights yet), then check cancel
    plan = downloads.plan_download(params.model, params.revision, params.variant, local_dir, endpoint)
    ctx.check_cancelled()

    # 3. Fetch what is missing, reporting progress; cancel raises inside the download threads
    def report(progress: DownloadProgress) -> None:
        ctx.emit(EVENT_DOWNLOAD, asdict(progress))
        ctx.progress(progress.bytes_done, progress.bytes_total, progress.elapsed)

    try:
        folder, fetched = downloads.download(plan, params.revision, report, ctx.is_cancelled, local_dir, endpoint)
    except downloads.Cancelled:
        ctx.check_cancelled()
        raise
    family = family_of_class_name(plan.model_index.get("_class_name"))
    return DownloadResult(
        model=str(local_dir) if local_dir is not None else params.model,
        path=str(folder),
        revision=plan.commit,
        files=sorted(plan.files),
        size=plan.size,
        downloaded=fetched,
        family=family.name if family else "",
        variant="fp16" if any(downloads.is_fp16(path) for path in plan.files) else "fp32",
        seconds=time.perf_counter() - start,
    )
