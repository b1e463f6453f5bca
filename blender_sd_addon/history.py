"""History records: what was generated, with which settings, into which files.

Blender-free. A record turns into flat values a Blender PropertyGroup can hold (`to_fields`) and back
(`from_fields`), and into plain JSON for export.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .protocol import GenerateResult, ImageRecord

HISTORY_LIMIT = 50  # newest first; older records are dropped, their files stay on disk

# The generate parameters a record keeps: enough to repeat the image.
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
)


@dataclass
class HistoryRecord:
    prompt: str
    negative_prompt: str
    seed: int
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

    @classmethod
    def from_result(cls, result: GenerateResult) -> HistoryRecord:
        settings = {name: result.params[name] for name in SETTINGS}
        return cls(**settings, seed=result.seed, model=result.model, files=[asdict(i) for i in result.images])

    def settings(self) -> dict:
        """Generate parameters that repeat this record."""
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

    # Blender's IntProperty is 32-bit signed while seeds go to 2**32 - 1, so the seed is kept as text;
    # the file list is kept as JSON text.
    def to_fields(self) -> dict[str, Any]:
        values = self.to_dict()
        values["seed"] = str(self.seed)
        values["files"] = json.dumps(self.files)
        return values

    @classmethod
    def from_fields(cls, item: Any) -> HistoryRecord:
        """Read a record back from an object with the attributes `to_fields` wrote (a PropertyGroup)."""
        values = {f.name: getattr(item, f.name) for f in fields(cls)}
        values["seed"] = int(values["seed"])
        values["files"] = json.loads(values["files"] or "[]")
        return cls(**values)
