"""Measurement: the `project` task (texture a mesh from many views), per view split into depth render,
generation, projection + bake, and fill; plus the UV-mapped primitives the projection tests and this
benchmark share (plane, cube, UV sphere, torus).

One fresh process runs the whole task (backend.tasks.project.run, as the worker does) on a torus of about
20 000 triangles seen from 8 orbit views (two rings of 4), with a random-weight depth ControlNet built
from the model's U-Net. Target: per view, everything but generation (render + projection/bake + a share of
the final fill) stays within 10 % of the generation time (sd15 at 256 px, few steps).

`python -m benchmarks --only project_sd15` (or project_tiny); the parent spawns
`python -m benchmarks.project CONFIG OUT` and reads its JSON (the parent never imports torch).
"""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING

from benchmarks.common import (
    CACHE,
    REQUEST,
    Scenarios,
    measuring_process,
    median,
    model_dir,
    now,
    scenario_args,
    target,
)

if TYPE_CHECKING:  # the parent process never imports torch: the primitives import it when called
    from backend.projection import Mesh

OVERHEAD_TARGET = 0.10  # non-generation time per view / generation time per view
SETTINGS = {
    "tiny": {"width": 64, "height": 64, "steps": 2, "texture_size": 256},
    "sd15": {"width": 256, "height": 256, "steps": 4, "texture_size": 1024},
}
VIEWS = {"per_ring": 4, "elevations": (25.0, -25.0)}


def measure(scenarios: Scenarios, architecture: str) -> dict:
    config = {"architecture": architecture, "model": str(model_dir(architecture)), "runs": scenarios.runs}
    return summarise(measuring_process(["benchmarks.project"], config, scenarios.scratch, f"project-{architecture}"))


def summarise(raw: dict) -> dict:
    """Medians over runs of the per-view stage times (views that generated), and the overhead ratio."""
    per_run = []
    for run in raw["runs"]:
        views = [v for v in run["views"] if not v["skipped"]]
        stage = {key: sum(v["timings"][key] for v in views) / len(views) for key in ("render", "generate", "bake")}
        stage["fill"] = run["timings"]["fill_save"] / len(views)  # the final fill and save, shared by the views
        stage["total"] = run["timings"]["total"]
        stage["views"] = len(views)
        per_run.append(stage)
    stages = {key: median([r[key] for r in per_run]) for key in ("render", "generate", "bake", "fill", "total")}
    overhead = (stages["render"] + stages["bake"] + stages["fill"]) / stages["generate"]
    ms = {key: round(1000 * value, 1) for key, value in stages.items()}
    result = {
        "runs": len(per_run),
        "settings": raw["settings"],
        "triangles": raw["triangles"],
        "views": per_run[0]["views"],
        "per_view_ms": {key: ms[key] for key in ("render", "generate", "bake", "fill")},
        "object_seconds": round(stages["total"], 2),
        "coverage": raw["runs"][-1]["coverage"],
        "overhead_ratio": round(overhead, 4),
        "samples": per_run,
    }
    # The target is the real architecture's: the tiny model's generation costs next to nothing.
    result["targets"] = [
        target(f"non-generation / generation per view <= {OVERHEAD_TARGET}", result["overhead_ratio"], OVERHEAD_TARGET)
    ] if raw.get("architecture", "sd15") == "sd15" else []  # fmt: skip
    result["rows"] = [
        {"metric": "per view: depth render ms", "backend": ms["render"]},
        {"metric": "per view: generation ms", "backend": ms["generate"]},
        {"metric": "per view: projection + bake ms", "backend": ms["bake"]},
        {"metric": "per view: fill + save ms (shared)", "backend": ms["fill"]},
        {"metric": "non-generation / generation", "ratio": result["overhead_ratio"]},
        {"metric": f"whole object ({result['views']} views) s", "backend": result["object_seconds"]},
        {"metric": "coverage of the texels", "backend": f"{result['coverage'][0]:.2%}"},
    ]
    return result


# --- the measuring process ------------------------------------------------------------------------------


def main() -> None:
    config, out = scenario_args()
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch

    from backend.context import JobContext
    from backend.inputs import InputStore
    from backend.models import ModelManager
    from backend.tasks import project
    from backend.tiny_model import make_test_controlnet
    from blender_sd_addon.projection import orbit_views
    from sdtex_contract import protocol

    architecture = config["architecture"]
    controlnet = CACHE / f"controlnet-{architecture}"
    if not (controlnet / "config.json").is_file():
        make_test_controlnet(controlnet, config["model"])
    mesh = torus(segments=200, sides=50)  # 20 000 triangles
    points = mesh.triangles.reshape(-1, 3)
    centre = ((points.amax(0) + points.amin(0)) / 2).tolist()
    radius = float((points - torch.tensor(centre)).norm(dim=-1).max())
    cameras = np.array(orbit_views(centre, radius, **VIEWS), dtype=np.float32)
    store = InputStore()
    arrays = {
        "triangles": mesh.triangles.numpy(),
        "uvs": mesh.uvs.numpy(),
        "object_index": mesh.objects.numpy().astype(np.int32),
        "cameras": cameras,
    }
    refs = {name: {"sha256": store.put(np.ascontiguousarray(a).tobytes()), "dtype": str(a.dtype),
                   "shape": list(a.shape)} for name, a in arrays.items()}  # fmt: skip
    warm = arrays["cameras"][:1]  # the warm-up loads the model and ControlNet and paints one view
    warm_refs = refs | {"cameras": {"sha256": store.put(warm.tobytes()), "dtype": "float32", "shape": [1, 2, 4, 4]}}
    settings = SETTINGS[architecture]
    manager = ModelManager()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        common = {"model": config["model"], "controlnet": str(controlnet), **REQUEST, **settings, "output_dir": folder}
        params = protocol.ProjectParams.from_dict(common | refs)
        project.run(JobContext("warm-up", manager, store), protocol.ProjectParams.from_dict(common | warm_refs))
        for i in range(config["runs"]):
            print(f"project run {i + 1}/{config['runs']} ...", file=sys.stderr, flush=True)
            start = now()
            result = project.run(JobContext(f"bench{i}", manager, store), params)
            runs.append({"views": result.views, "timings": result.timings, "coverage": result.coverage,
                         "wall": now() - start})  # fmt: skip
            for path in Path(folder).iterdir():
                path.unlink()
    out.write_text(json.dumps({
        "runs": runs,
        "architecture": architecture,
        "settings": settings | {"views": len(cameras)},
        "triangles": len(mesh.triangles),
        "torch_threads": torch.get_num_threads(),
    }))  # fmt: skip


# --- UV-mapped primitives (tests and this benchmark) --------------------------------------------------------


def _grid_mesh(point, rows: int, columns: int) -> Mesh:
    import torch

    from backend.projection import Mesh

    """A (rows x columns)-quad grid surface: point(s, t) -> xyz for s, t in 0..1; UV = (s, 1 - t). Each quad
    is two triangles, wound counter-clockwise seen from the side its normal points to."""
    s = torch.linspace(0, 1, columns + 1, dtype=torch.float64)
    t = torch.linspace(0, 1, rows + 1, dtype=torch.float64)
    tt, ss = torch.meshgrid(t, s, indexing="ij")
    xyz = point(ss, tt)  # [rows + 1, columns + 1, 3]
    uv = torch.stack([ss, 1 - tt], -1)
    a, b = (slice(None, -1), slice(None, -1)), (slice(1, None), slice(None, -1))
    c, d = (slice(1, None), slice(1, None)), (slice(None, -1), slice(1, None))
    triangles, uvs = [], []
    for first, second, third in ((a, b, c), (a, c, d)):
        triangles.append(torch.stack([xyz[first], xyz[second], xyz[third]], -2).reshape(-1, 3, 3))
        uvs.append(torch.stack([uv[first], uv[second], uv[third]], -2).reshape(-1, 3, 2))
    triangles, uvs = torch.cat(triangles).float(), torch.cat(uvs).float()
    return Mesh(triangles, uvs, torch.zeros(len(triangles), dtype=torch.long))


def plane(size: float = 2.0, z: float = 0.0, rows: int = 1) -> Mesh:
    """A square in the XY plane facing +Z, UV (0, 0) at (-x, -y)."""
    import torch

    return _grid_mesh(
        lambda s, t: torch.stack([(s - 0.5) * size, (0.5 - t) * size, torch.full_like(s, z)], -1), rows, rows
    )


def uv_sphere(radius: float = 1.0, segments: int = 48, rings: int = 24) -> Mesh:
    """Latitude-longitude sphere; u goes round, v from the south pole (0) to the north pole (1)."""

    import torch

    def point(s, t):
        azimuth, polar = 2 * math.pi * s, math.pi * t
        return torch.stack(
            [radius * torch.sin(polar) * torch.cos(azimuth), radius * torch.sin(polar) * torch.sin(azimuth),
             radius * torch.cos(polar)], -1
        )  # fmt: skip

    return _grid_mesh(point, rings, segments)


def torus(major: float = 1.0, minor: float = 0.35, segments: int = 48, sides: int = 24) -> Mesh:
    """A ring round the Z axis; u goes round the ring, v round the tube."""

    import torch

    def point(s, t):
        around, tube = 2 * math.pi * s, -2 * math.pi * t  # this way round the normals point outwards
        ring = major + minor * torch.cos(tube)
        return torch.stack([ring * torch.cos(around), ring * torch.sin(around), minor * torch.sin(tube)], -1)

    return _grid_mesh(point, sides, segments)


def cube(size: float = 2.0, rows: int = 1) -> Mesh:
    import torch

    from backend.projection import Mesh
    """Six square faces, each its own UV island in a 3 x 2 layout with gaps between the islands."""
    h = size / 2
    faces = [  # (origin corner, direction of s, direction of t) with s x t pointing outwards... or inwards
        ((-h, -h, h), (1, 0, 0), (0, 1, 0)),
        ((-h, h, -h), (1, 0, 0), (0, -1, 0)),
        ((-h, -h, -h), (1, 0, 0), (0, 0, 1)),
        ((h, h, -h), (-1, 0, 0), (0, 0, 1)),
        ((h, -h, -h), (0, 1, 0), (0, 0, 1)),
        ((-h, h, -h), (0, -1, 0), (0, 0, 1)),
    ]
    triangles, uvs = [], []
    for index, (origin, du, dv) in enumerate(faces):
        o, su, sv = (torch.tensor(v, dtype=torch.float64) for v in (origin, du, dv))
        face = _grid_mesh(lambda s, t, o=o, su=su, sv=sv: o + size * (s[..., None] * su + (1 - t)[..., None] * sv),
                          rows, rows)  # fmt: skip
        column, row = index % 3, index // 3
        island = face.uvs * 0.3 + torch.tensor([0.025 + column / 3, 0.1 + row / 2])
        triangles.append(face.triangles)
        uvs.append(island)
    triangles, uvs = torch.cat(triangles), torch.cat(uvs)
    return Mesh(triangles, uvs, torch.zeros(len(triangles), dtype=torch.long))


if __name__ == "__main__":
    main()
