"""History records: what was generated, with which settings, into which files.

Blender-free. A record turns into flat values a Blender PropertyGroup can hold (`to_fields`) and back
(`from_fields`), and into plain JSON for export.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import protocol
from .protocol import GenerateResult, ImageRecord

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
    "seamless",
    "pbr",
    "normal_format",
    *PBR_CONTROLS,
)
PBR_SETTINGS = ("seamless", "normal_format", *PBR_CONTROLS)


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
    files: list[dict] = field(default_factory=list)  # one ImageRecord dict per image: path, seed, maps
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    normal_format: str = "opengl"  # how to read the normal map when applying again
    normal_strength: float = protocol.param("normal_strength").default
    height_contrast: float = protocol.param("height_contrast").default
    roughness_contrast: float = protocol.param("roughness_contrast").default
    ao_strength: float = protocol.param("ao_strength").default
    task: str = "txt2img"  # or "pbr": maps derived from `source`, files[0]["path"] its file ("" when uploaded)
    source: str = ""  # the pbr task's source image, by its name in the .blend

    @classmethod
    def from_result(cls, result: GenerateResult, source: str = "") -> HistoryRecord:
        """The record of a finished job; `source` names the image a pbr job derived its maps from."""
        # A pbr job has no prompt, steps...: those keep their defaults. Its size is the source image's.
        settings = {name: result.params.get(name, protocol.param(name).default) for name in SETTINGS}
        settings.update(width=result.width, height=result.height, pbr=any(i.maps for i in result.images))
        files = [asdict(i) for i in result.images]
        return cls(**settings, seed=result.seed, model=result.model, files=files, task=result.task, source=source)

    @property
    def title(self) -> str:
        """One line for the history list."""
        if self.task == "pbr":
            return f"Maps of {self.source or 'an image'}"
        return self.prompt or "(no prompt)"

    def settings(self) -> dict:
        """The task parameters that repeat this record (a pbr record's image aside)."""
        if self.task == "pbr":
            return {name: getattr(self, name) for name in PBR_SETTINGS}
        return {name: getattr(self, name) for name in SETTINGS} | {"seed": self.seed, "model": self.model}

    def images(self) -> list[ImageRecord]:
        return [ImageRecord(**f) for f in self.files]

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
    # ("" for none); the file list is kept as JSON text.
    def to_fields(self) -> dict[str, Any]:
        values = self.to_dict()
        values["seed"] = "" if self.seed is None else str(self.seed)
        values["files"] = json.dumps(self.files)
        return values

    @classmethod
    def from_fields(cls, item: Any) -> HistoryRecord:
        """Read a record back from an object with the attributes `to_fields` wrote (a PropertyGroup)."""
        values = {f.name: getattr(item, f.name) for f in fields(cls)}
        values["seed"] = int(values["seed"]) if values["seed"] else None
        values["files"] = json.loads(values["files"] or "[]")
        return cls(**values)
