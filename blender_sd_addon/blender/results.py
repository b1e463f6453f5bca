"""A finished job in Blender: its written images loaded, a history record, and its first image (with its maps)
put on the meshes as a material; a travel job's frames become image sequences that play with the timeline.

Used alike by api.py (scripts, background mode) and the UI job timer (ui_jobs.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import bpy

from ..client import SDTexError
from ..contract import protocol
from ..history import HistoryRecord
from . import materials, relocate
from .history_store import add_history
from .materials import ApplyOptions


@dataclass
class TextureResult:
    images: list  # bpy.types.Image, one per image (albedo): generated, or the pbr task's source image
    maps: list[dict]  # per image: "height" | "normal" | "roughness" | "ao" | ... -> bpy.types.Image (empty: no maps)
    materials: list  # bpy.types.Material made by applying the first image (empty when not applied)
    files: list[str]  # every file written: albedo images and PBR maps
    seed: int | None  # None for the pbr task
    result: protocol.GenerateResult


def finish(
    result: protocol.GenerateResult,
    meshes: list,
    options: ApplyOptions | None,
    apply: bool,
    source: str = "",
    mask: str = "",
) -> TextureResult:
    """Load the written images, record the job, and apply its first image (with its maps) to the meshes.

    source: the name of the image a pbr job derived its maps from (the material's albedo), or an image task
    started from (its results are new images: the source is never changed). mask: an inpaint job's mask.
    """
    if result.task == "travel":
        return finish_travel(result, meshes, options, apply)
    files = written_files(result)
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise SDTexError(f"The backend reported images that are not on disk: {', '.join(missing)}")
    if result.task == "pbr":  # the source is gone when deleted while a UI job ran: applying says so
        albedos = [image] if (image := bpy.data.images.get(source)) else []
    else:
        albedos = [bpy.data.images.load(i.path, check_existing=True) for i in result.images]
    maps = [{kind: materials.load_image(path, kind) for kind, path in i.maps.items()} for i in result.images]
    # Recorded before applying: if applying fails, the files are still found in the history.
    record = HistoryRecord.from_result(result, source=source, mask=mask)
    add_history(bpy.context.scene, record)
    relocate.remember(files)
    made = apply_record(record, meshes, options) if apply else []
    return TextureResult(images=albedos, maps=maps, materials=made, files=files, seed=result.seed, result=result)


def add_training_history(result: protocol.TrainResult) -> HistoryRecord:
    """Record a finished training: its LoRA file, with the settings it was trained with."""
    params = result.params
    record = HistoryRecord(
        prompt=str(params.get("instance_prompt", "")), negative_prompt="", seed=params.get("seed"), steps=result.steps,
        guidance_scale=0.0, width=int(params.get("resolution", 0)), height=int(params.get("resolution", 0)),
        scheduler="", seamless="none", pbr=False, model=str(params.get("model", "")),
        files=[{"path": result.lora, "seed": None, "maps": {}}], task=result.task,
        params={k: v for k, v in params.items() if k != "output_dir"} | {"loss": result.loss},
    )  # fmt: skip
    add_history(bpy.context.scene, record)
    relocate.remember([result.lora])
    return record


def written_files(result: protocol.GenerateResult) -> list[str]:
    """Every file a job wrote: albedos (not the pbr task's source) and maps."""
    albedos = result.task != "pbr"
    return [path for i in result.images for path in ([i.path] if albedos else []) + list(i.maps.values())]


def apply_record(record: HistoryRecord, meshes: list, options: ApplyOptions) -> list:
    """Put a record's first image, with its maps, on the meshes (Apply again). The albedo of a pbr record is
    its source image, found by name (or by its file, when it came from one)."""
    image = record.images()[0]
    albedo, name = image.path, record.title
    if record.task == "pbr":
        source = bpy.data.images.get(record.source)
        if source is None and not os.path.isfile(image.path):
            raise SDTexError(f"The image {record.source!r} these maps were made from is no longer in this file")
        albedo, name = source or image.path, record.source
    options = dataclasses.replace(options, normal_directx=record.normal_format == "directx")
    # A delit albedo (maps["albedo"]) is the base colour; the record's path keeps the lit original.
    maps = {"albedo": albedo, **image.maps}
    try:
        return materials.apply_images(meshes, maps, options, material_name(name), image.map_sources)
    except ValueError as exc:
        raise SDTexError(str(exc)) from None


def material_name(text: str) -> str:
    words = " ".join(text.split())
    return "SD " + (words[:40].rstrip() + "…" if len(words) > 40 else words)


# --- travel: image sequences on the material ------------------------------------------------------------


def finish_travel(
    result: protocol.GenerateResult, meshes: list, options: ApplyOptions | None, apply: bool
) -> TextureResult:
    """A finished travel job: its frames as sequences, applied to the meshes."""
    files = written_files(result)
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise SDTexError(f"The backend reported frames that are not on disk: {', '.join(missing[:3])}")
    first = result.images[0]
    images = {kind: sequence_image(path, kind) for kind, path in {"albedo": first.path, **first.maps}.items()}
    made = []
    if apply:
        options = dataclasses.replace(options, normal_directx=result.params.get("normal_format") == "directx")
        name = material_name(f"Travel {result.params['keyframes'][0]['prompt']}")
        loop, start = bool(result.params.get("loop")), bpy.context.scene.frame_start
        try:
            made = apply_sequences(meshes, images, options, name, len(result.images), loop, start, first.map_sources)
        except ValueError as exc:
            raise SDTexError(str(exc)) from None
    maps = {kind: image for kind, image in images.items() if kind != "albedo"}
    return TextureResult([images["albedo"]], [maps], made, files, result.seed, result)


def sequence_image(path: str, kind: str) -> bpy.types.Image:
    """The image of a sequence's first file (`<prefix>_0001.png`), read as the whole numbered sequence."""
    image = materials.load_image(path, kind)
    image.source = "SEQUENCE"
    return image


def play_as_sequence(image_user: bpy.types.ImageUser, length: int, start: int, cyclic: bool) -> None:
    """Show file N of the sequence at scene frame start + N - 1; past the end: again from the first (cyclic)
    or the last file held."""
    image_user.frame_duration = length
    image_user.frame_start = start
    image_user.frame_offset = 0
    image_user.use_cyclic = cyclic
    image_user.use_auto_refresh = True  # follow the scene's frame in the viewport and renders


def apply_sequences(
    meshes: list, images: dict[str, bpy.types.Image], options: ApplyOptions, name: str, length: int,
    cyclic: bool, start: int, sources: dict[str, str] | None = None,
) -> list[bpy.types.Material]:  # fmt: skip
    """materials.apply_images with every map an image sequence of `length` frames from scene frame `start`."""
    made = materials.apply_images(meshes, images, options, name, sources)
    sequences = set(images.values())
    for material in made:
        for node in material.node_tree.nodes:
            if node.type == "TEX_IMAGE" and node.image in sequences:
                play_as_sequence(node.image_user, length, start, cyclic)
    return made
