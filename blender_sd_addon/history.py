"""History records: what was generated, with which settings, into which files.

Blender-free. A record turns into flat values a Blender PropertyGroup can hold (`to_fields`) and back
(`from_fields`), and into plain JSON for export.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .contract import protocol
from .contract.protocol import GenerateResult, ImageRecord

HISTORY_LIMIT = 50  # newest first; older records are dropped, their files stay on disk

PBR_CONTROLS = ("normal_strength", "height_contrast", "roughness_contrast", "ao_strength")
# The parameters a record keeps: enough to repeat the image (txt2img), or the maps (pbr: these and its source).
SETTINGS = (
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "scheduler",
    "speed",
    "seamless",
    "pbr",
    "normal_format",
    *PBR_CONTROLS,
)
# Each map's method (classical or a Marigold model), the delight switch and how the estimators sample: kept in a
# record's params (every task with maps has them), restored by "Use these settings". The estimator models are the
# preferences' (like the generator's model): sent with every request, never restored from a record.
PBR_METHODS = ("normal_method", "height_method", "roughness_method", "metallic_method", "delight")
PBR_METHOD_SETTINGS = (*PBR_METHODS, *(p.name for p in protocol.ESTIMATE_SAMPLING))
ESTIMATOR_MODELS = tuple(p.name for p in protocol.ESTIMATOR_MODELS)  # depth_model, normals_model, intrinsics_model
PBR_FIELDS = ("seamless", "normal_format", *PBR_CONTROLS)  # the pbr task's settings a record holds as fields
PBR_SETTINGS = (*PBR_FIELDS, *PBR_METHOD_SETTINGS)
# Tasks that make maps of a given image rather than a new image: the Image Editor's PBR panel runs them.
MAP_TASKS = ("pbr", "estimate")
# Tasks that repaint a given image with a model (img2img, inpaint, make_seamless, upscale): their records
# keep every parameter of the job but its image inputs, so "Use these settings" restores the task's own.
IMAGE_TASKS = tuple(
    task
    for task, table in protocol.TASK_PARAMS.items()
    if task not in MAP_TASKS and any(p.kind is protocol.ImageInput for p in table)
)
TASK_TITLES = {"img2img": "Variation of", "inpaint": "Inpainted", "make_seamless": "Seamless", "upscale": "Upscaled"}


@dataclass
class HistoryRecord:
    prompt: str
    negative_prompt: str
    seed: int | None  # None when nothing was sampled (the pbr task)
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    seamless: str
    pbr: bool
    model: str
    files: list[dict] = field(default_factory=list)  # one ImageRecord dict per image: path, seed, maps, map_sources
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    normal_format: str = "opengl"  # how to read the normal map when applying again
    speed: str = "off"  # records from before Speed existed ran without the cache
    normal_strength: float = protocol.param("normal_strength").default
    height_contrast: float = protocol.param("height_contrast").default
    roughness_contrast: float = protocol.param("roughness_contrast").default
    ao_strength: float = protocol.param("ao_strength").default
    task: str = "txt2img"  # or "pbr": maps derived from `source`, files[0]["path"] its file ("" when uploaded)
    source: str = ""  # the source image of a pbr or image task, by its name in the .blend
    mask: str = ""  # the mask image of an inpaint job, by its name in the .blend ("" when none)
    params: dict = field(default_factory=dict)  # the job's parameters, its image inputs left out

    @classmethod
    def from_result(cls, result: GenerateResult, source: str = "", mask: str = "") -> HistoryRecord:
        """The record of a finished job; `source` (and `mask`) name the images a pbr or image task read."""
        # A pbr job has no prompt, steps...: those keep their defaults. Its size is the source image's.
        settings = {name: result.params.get(name, protocol.param(name).default) for name in SETTINGS}
        settings.update(width=result.width, height=result.height, pbr=any(i.maps for i in result.images))
        files = [asdict(i) for i in result.images]
        # Every parameter but the images: "Use these settings" restores them (a pbr record: its map methods).
        table = protocol.TASK_PARAMS.get(result.task, ())
        images = {p.name for p in table if p.kind is protocol.ImageInput}
        params = {name: value for name, value in result.params.items() if name not in images}
        return cls(
            **settings,
            seed=result.seed,
            model=result.model,
            files=files,
            task=result.task,
            source=source,
            mask=mask,
            params=params,
        )

    @property
    def title(self) -> str:
        """One line for the history list."""
        if self.task == "pbr":
            return f"Maps of {self.source or 'an image'}"
        if self.task in IMAGE_TASKS:
            of = f"{TASK_TITLES.get(self.task, self.task)} {self.source or 'image'}"
            return f"{of}: {self.prompt}" if self.prompt else of
        return self.prompt or "(no prompt)"

    def settings(self) -> dict:
        """The task parameters that repeat this record (a pbr or image task's images aside).

        An image task's are its job's own parameters, with the seed the job used (its `seed` parameter may
        have been unset) and the size it asked for (the record's width and height are the result's)."""
        if self.task == "pbr":  # records from before the methods were kept restore the fields only
            methods = {name: self.params[name] for name in PBR_METHOD_SETTINGS if name in self.params}
            return {name: getattr(self, name) for name in PBR_FIELDS} | methods
        if self.task in IMAGE_TASKS:
            return self.params | {"seed": self.seed}
        fields_ = {name: getattr(self, name) for name in SETTINGS}  # records from before params were kept
        return fields_ | self.params | {"seed": self.seed, "model": self.model}

    def images(self) -> list[ImageRecord]:
        return [ImageRecord(**f) for f in self.files]

    def delit_albedo(self) -> str:
        """The first image's delit albedo file ("" when the job did not delight)."""
        files = self.images()
        return files[0].maps.get("albedo", "") if files else ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HistoryRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> HistoryRecord:
        return cls.from_dict(json.loads(text))

    # Blender's IntProperty is 32-bit signed while seeds go to 2**32 - 1, so the seed is kept as text
    # ("" for none); the file list and the parameters are kept as JSON text.
    def to_fields(self) -> dict[str, Any]:
        values = self.to_dict()
        values["seed"] = "" if self.seed is None else str(self.seed)
        values["files"] = json.dumps(self.files)
        values["params"] = json.dumps(self.params)
        return values

    @classmethod
    def from_fields(cls, item: Any) -> HistoryRecord:
        """Read a record back from an object with the attributes `to_fields` wrote (a PropertyGroup)."""
        values = {f.name: getattr(item, f.name) for f in fields(cls)}
        values["seed"] = int(values["seed"]) if values["seed"] else None
        values["files"] = json.loads(values["files"] or "[]")
        values["params"] = json.loads(values["params"] or "{}")
        return cls(**values)
