"""Write a job's files: complete under a temporary name first, then published under a final name that
never overwrites anything, each announced as an artifact the moment it is complete.

Every PNG goes through write_png. Each generated picture (albedo, projection view, training sample) carries
an A1111 `parameters` text chunk describing what its task ran (backend.infotext; read by most SD tools) and
an `sdtex` chunk with the full settings as JSON, so any texture can be regenerated from the file alone. PBR
maps (a delit albedo included), masks and depth images carry only the `sdtex` chunk (naming the role and the
albedo): other tools must not list a normal map as a generated image.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from backend import __version__
from backend.context import JobContext
from backend.estimated_maps import STAGE as ESTIMATING
from backend.estimated_maps import job_estimators, needed_estimators, wants_maps
from backend.infotext import GENERATED_ROLES, a1111_parameters
from backend.pbr import maps_for
from sdtex_contract.protocol import (
    INVALID_PARAMS,
    OUTPUT_FAILED,
    PROTOCOL_VERSION,
    Artifact,
    ImageRecord,
    ProtocolError,
    TaskParams,
)

PREFIX_MAX = 64
TEMP_PREFIX = ".sdtex-partial-"  # hidden, and never a name a finished file gets
# A map's role in its PNG's sdtex chunk where it differs from the map's name: a delit albedo is a map, not the
# generated picture (no A1111 chunk).
PNG_ROLES = {"albedo": "delit_albedo"}

Announce = Callable[[Artifact], None]


def sanitise_prefix(prefix: str) -> str:
    """Letters, digits, '-', '_' and inner dots only: no separators, no '..', no hidden files."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix).strip("._")[:PREFIX_MAX]
    return cleaned or "sdtex"


def run_stamp() -> str:
    """A job's part of its file names: the time and a random part, so no other client can guess them."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def _output_failed(folder: str | Path, exc: OSError) -> ProtocolError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return ProtocolError(
        OUTPUT_FAILED,
        f"cannot write to output_dir {str(folder)!r}: {reason}",
        {"param": "output_dir", "value": str(folder), "errno": exc.errno},
    )


def output_folder(params: TaskParams) -> Path:
    """The absolute output folder, created and proven writable (checked before any expensive work)."""
    folder = Path(params.output_dir)
    if not folder.is_absolute():
        raise ProtocolError(
            INVALID_PARAMS,
            f"output_dir must be an absolute path, got {params.output_dir!r}",
            {"param": "output_dir", "accepted": "an absolute path", "value": params.output_dir},
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder = folder.resolve()
        probe = folder / f"{TEMP_PREFIX}probe-{secrets.token_hex(4)}"
        try:
            with open(probe, "xb") as f:
                f.write(b"\0" * 4096)  # a full disk still creates empty files: write something
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise _output_failed(params.output_dir, exc) from None
    return folder


def png_info(
    params: TaskParams,
    seed: int | None,
    size: tuple[int, int],
    role: str = "albedo",
    source: str = "",
    context: Mapping | None = None,
) -> PngInfo:
    """Metadata: the `sdtex` JSON chunk always; the A1111 `parameters` chunk on generated pictures."""
    info = PngInfo()
    if role in GENERATED_ROLES:
        info.add_text("parameters", a1111_parameters(params, seed, size, context))
    settings = {
        "params": params.to_dict(),
        "seed": seed,
        "role": role,
        "protocol_version": PROTOCOL_VERSION,
        "backend_version": __version__,
    }
    if source:
        settings["source"] = source
    info.add_text("sdtex", json.dumps(settings))
    return info


def publish(temporary: Path, folder: Path, stem: str, suffix: str = ".png") -> Path:
    """Give a complete file the name `<stem><suffix>` (or `<stem>_N<suffix>` when taken) without ever replacing
    anything there: a hard link fails on any existing name, a planted symlink included."""
    for n in range(10_000):
        final = folder / f"{stem}{f'_{n}' if n else ''}{suffix}"
        try:
            os.link(temporary, final)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP) or final.exists():
                raise
            os.rename(temporary, final)  # no hard links here (FAT): the name was free a moment ago
            return final
        os.unlink(temporary)
        return final
    raise ProtocolError(INVALID_PARAMS, f"too many files named {stem}_N{suffix} in {folder}", {"param": "output_dir"})


def write_png(
    image: PIL.Image.Image,
    folder: Path,
    stem: str,
    params: TaskParams,
    seed: int | None,
    role: str = "albedo",
    *,
    source: str = "",
    context: Mapping | None = None,
) -> tuple[Path, int, str]:
    """Write one PNG with both metadata chunks (png_info) completely (flushed to disk) and publish it: every PNG
    a task writes comes through here. Returns (path, size, sha256)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(params, seed, image.size, role, source, context))
    data = buffer.getvalue()
    temporary = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}.png"
    try:
        with open(temporary, "xb") as f:  # buffered: a short write is retried or raises, never silently kept
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        path = publish(temporary, folder, stem)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise _output_failed(folder, exc) from None
    if path.resolve().parent != folder:
        raise ProtocolError(INVALID_PARAMS, f"file name {stem!r} leaves output_dir", {"param": "filename_prefix"})
    return path, len(data), hashlib.sha256(data).hexdigest()


def write_map(
    picture: PIL.Image.Image,
    folder: Path,
    stem: str,
    params: TaskParams,
    name: str,
    *,
    seed: int | None,
    source: str | None,
    index: int = 0,
    announce: Announce | None = None,
) -> str:
    """Write and announce an albedo (source None) or one of its maps (source: the albedo's path, "" when it came
    in as bytes); the map's name is its artifact role, its PNG role that too unless PNG_ROLES says otherwise."""
    role = name if source is None else PNG_ROLES.get(name, name)
    path, size, digest = write_png(picture, folder, stem, params, seed, role, source=source or "")
    if announce:
        kind = "image" if source is None else "map"
        announce(Artifact(path=str(path), kind=kind, size=size, sha256=digest, index=index, role=name))
    return str(path)


def write_maps(
    maps: Mapping[str, PIL.Image.Image], folder: Path, base: str, params: TaskParams, **where: Any
) -> dict[str, str]:
    """write_map for each map as `<base>_<name>.png`; name -> path."""
    return {name: write_map(m, folder, f"{base}_{name}", params, name, **where) for name, m in maps.items()}


def input_stem(params: TaskParams, source: str) -> str:
    """The file-name stem of maps of an input image: a file's own name, or for uploaded bytes the prefix and
    the job's stamp (a generated albedo's maps are named after it likewise)."""
    return sanitise_prefix(Path(source).stem) if source else f"{sanitise_prefix(params.filename_prefix)}_{run_stamp()}"


def job_maps(
    image: PIL.Image.Image, params: TaskParams, ctx: JobContext | None = None
) -> tuple[dict[str, PIL.Image.Image], dict[str, str]]:
    """backend.pbr.maps_for within a job: estimators (when a map's method is "model") run on the job's Estimators
    under the stage "estimating_maps", their steps as the job's progress, the job's cancel honoured."""
    if ctx is None or not needed_estimators(params):
        return maps_for(image, params)
    ctx.stage(ESTIMATING)
    start = time.perf_counter()
    on_step = lambda step, total: ctx.progress(step, total, time.perf_counter() - start)  # noqa: E731
    maps = maps_for(image, params, job_estimators(ctx), on_step=on_step, is_cancelled=ctx.is_cancelled)
    ctx.stage("saving")
    return maps


def save_image_set(
    image: PIL.Image.Image,
    params: TaskParams,
    folder: Path,
    stem: str,
    *,
    index: int = 0,
    seed: int | None = None,
    albedo: bool = True,
    announce: Announce | None = None,
    ctx: JobContext | None = None,
) -> ImageRecord:
    """Write an albedo (unless albedo=False: the image came in as an input) and, when params.pbr is set or
    the task is `pbr`, its maps (job_maps: estimated ones need `ctx`); announce each file as it is complete.
    A delit albedo is the map "albedo" (`<stem>_albedo.png`, artifact kind "map"; its PNG role "delit_albedo")."""

    where = dict(seed=seed, index=index, announce=announce)
    record = ImageRecord(path=write_map(image, folder, stem, params, "albedo", source=None, **where) if albedo else "",
                         seed=seed)  # fmt: skip
    if wants_maps(params):
        maps, record.map_sources = job_maps(image, params, ctx)
        base = Path(record.path).stem if record.path else stem
        record.maps = write_maps(maps, folder, base, params, source=record.path, **where)
    return record


def save_images(
    images: list[PIL.Image.Image],
    seeds: list[int | None],
    params: TaskParams,
    announce: Announce | None = None,
    names: list[str] | None = None,
    ctx: JobContext | None = None,
) -> list[ImageRecord]:
    """Save each generated image (and its PBR maps when asked; estimated ones need `ctx`), announcing every file
    once complete. names: each image's part of its file name after the job's stamp (default: its seed)."""
    folder = output_folder(params)
    prefix = sanitise_prefix(params.filename_prefix)
    stamp = run_stamp()
    names = names if names is not None else [str(seed) for seed in seeds]
    return [
        save_image_set(
            image, params, folder, f"{prefix}_{stamp}_{name}", index=i, seed=seed, announce=announce, ctx=ctx
        )
        for i, (image, seed, name) in enumerate(zip(images, seeds, names, strict=True))
    ]
