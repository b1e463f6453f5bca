"""Measurement: the cost of synchronizing the views (issue 22's target: at most 10 % of the U-Net's time for the
same step), on the SD-1.5 architecture with random weights at 512 px with 8 views.

Per denoising step, synchronized mode adds: the predicted clean latents from the model output, their bake into
the latent texture, its render back into every view and the model output that makes the scheduler see it
(backend/view_sync.py). This times exactly that against one forward of SD-1.5's U-Net on the same 8 views
(batch 8, guidance off; CFG doubles the U-Net's share), in one process, and prints the ratio. Building the
latent views (rasterizing the 8 views and the texels) happens once per job and is reported apart.

`python -m benchmarks.view_sync [--views 8] [--size 512] [--texture 1024] [--runs 2] [--out FILE]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TARGET = 0.10  # synchronization's seconds per step / the U-Net's seconds per step


def _seconds(call, runs: int) -> float:
    call()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(views: int, size: int, texture: int, runs: int) -> dict:
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from backend import projection as geometry
    from backend import synchronized, view_sync
    from benchmarks.project import torus
    from blender_sd_addon.projection import orbit_views

    torch.manual_seed(0)
    mesh = torus(0.6, 0.25, 128, 64)
    per_ring = max(1, views // 2)
    cams = orbit_views((0, 0, 0), 1.6, per_ring=per_ring, elevations=(25.0, -25.0))[:views]
    cameras = [geometry.Camera(torch.tensor(v), torch.tensor(p), size, size) for v, p in cams]
    start = time.perf_counter()
    latent_views = view_sync.LatentViews.build(mesh, cameras, 8, synchronized.latent_texture_size(texture))
    build = time.perf_counter() - start

    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[5]
    sample = torch.randn(views, 4, size // 8, size // 8)
    output = torch.randn_like(sample)

    def synchronize():
        level = view_sync._NoiseLevel(scheduler, t)
        clean = latent_views.synchronize(level.clean(output, sample), 3.0)
        return level.output(clean, sample)

    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=size // 8).eval()  # SD-1.5's U-Net
    text = torch.randn(views, 77, 768)
    with torch.no_grad():
        sync = _seconds(synchronize, max(runs, 5))
        step = _seconds(lambda: unet(sample, t, encoder_hidden_states=text), runs)
    return {
        "views": views, "size": size, "latent_texture": synchronized.latent_texture_size(texture),
        "triangles": len(mesh.triangles), "sightings": len(latent_views.bake_texel),
        "build_s": round(build, 3), "sync_s_per_step": round(sync, 4), "unet_s_per_step": round(step, 3),
        "ratio": round(sync / step, 4), "target": TARGET,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.view_sync", description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=8, help="how many views")
    parser.add_argument("--size", type=int, default=512, help="each view's side, pixels")
    parser.add_argument("--texture", type=int, default=1024, help="the baked texture's side, pixels")
    parser.add_argument("--runs", type=int, default=2, help="U-Net forwards timed after a warm-up (median)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(args.views, args.size, args.texture, args.runs)
    verdict = "met" if result["ratio"] <= TARGET else "MISSED"
    print(json.dumps(result, indent=2))
    print(f"synchronization / U-Net step: {result['ratio']:.4f} (target <= {TARGET}: {verdict})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
