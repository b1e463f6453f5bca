"""Measurement 1: warm overhead per request against bare diffusers (same model, request and seed).

What each side includes, every run timed with the model already loaded:
- bare: `pipe(...)` to a PIL image, plus a plain `image.save(png)` (timed apart: `bare_pipe_ms`).
- backend: submit to terminal reply in a client process (BackendClient): validation, JSON lines both
  ways, progress events, the worker's run and its PNG with metadata.
- add-on: `bpy.ops.sdtex.generate()` in Blender: the above plus parameter checks, loading the image
  into Blender, a new material on the Cube and the history entry.
Ratios and overheads compare medians against bare with the PNG save. The breakdown rows are medians
of per-request differences, so they show where the time goes on each layer.
"""

from __future__ import annotations

from benchmarks.common import Scenarios, difference_band, median, target

RATIO_TARGET, OVERHEAD_TARGET_MS = 1.02, 20.0


def ms(values: list[float]) -> float:
    return round(1000 * median(values), 2)


def spread_pct(values: list[float]) -> float:
    """(max - min) / median: how far apart the runs of one side were."""
    return round(100 * (max(values) - min(values)) / median(values), 1)


def measure(scenarios: Scenarios, architecture: str) -> dict:
    bare = scenarios.get("bare", architecture)
    client = scenarios.get("client", architecture)
    addon = scenarios.get("addon", architecture)
    bare_runs = bare["runs"][1:]  # run 0 is the first image (cold)
    warm = client["warm"]
    bare_walls = [r["pipe"] + r["save"] for r in bare_runs]
    compute = [sum(r["timings"][k] for k in ("encode", "denoise", "decode")) for r in warm]
    result = {
        "runs": len(warm),
        "bare_pipe_ms": ms([r["pipe"] for r in bare_runs]),
        "bare_save_ms": ms([r["save"] for r in bare_runs]),
        "bare_ms": ms(bare_walls),
        "backend_ms": ms([r["wall"] for r in warm]),
        "backend_worker_total_ms": ms([r["timings"]["total"] for r in warm]),
        "backend_worker_compute_ms": ms(compute),
        "backend_worker_save_ms": ms([r["timings"]["save"] for r in warm]),
        "backend_worker_bookkeeping_ms": ms(
            [r["timings"]["total"] - c - r["timings"]["save"] for r, c in zip(warm, compute, strict=True)]
        ),
        "backend_transport_ms": ms([r["wall"] - r["timings"]["total"] for r in warm]),
        "addon_ms": ms(addon["walls"]),
        "addon_worker_total_ms": ms([r["worker"] for r in addon["run"]]),
        "addon_transport_ms": ms([r["wall"] - r["worker"] for r in addon["run"]]),
        "addon_finish_ms": ms([r["wall"] for r in addon["finish"]]),
        "addon_operator_rest_ms": ms([
            wall - run["wall"] - finish["wall"]
            for wall, run, finish in zip(addon["walls"], addon["run"], addon["finish"], strict=True)
        ]),
        "addon_applied": addon["applied"],
        # The same seed on both sides must give the same pixels, or the sides did not do the same work.
        "same_pixels": len({r["pixels_sha256"] for r in bare_runs + warm}) == 1,
        "spread_pct": {
            "bare": spread_pct(bare_walls),
            "backend": spread_pct([r["wall"] for r in warm]),
            "addon": spread_pct(addon["walls"]),
        },
        "samples_ms": {
            "bare": [round(1000 * w, 2) for w in bare_walls],
            "backend": [round(1000 * r["wall"], 2) for r in warm],
            "addon": [round(1000 * w, 2) for w in addon["walls"]],
        },
    }
    targets = []
    for side, walls in (("backend", [r["wall"] for r in warm]), ("addon", addon["walls"])):
        ratio = result[f"{side}_ms"] / result["bare_ms"]
        overhead = result[f"{side}_ms"] - result["bare_ms"]
        band = 1000 * difference_band(bare_walls, walls)
        result[f"{side}_ratio"] = round(ratio, 4)
        result[f"{side}_overhead_ms"] = round(overhead, 2)
        result[f"{side}_noise_band_ms"] = round(band, 2)
        targets += [
            target(f"{side} warm ratio <= {RATIO_TARGET}", round(ratio, 4), RATIO_TARGET, band / result["bare_ms"]),
            target(f"{side} warm overhead <= {OVERHEAD_TARGET_MS:g} ms", round(overhead, 2), OVERHEAD_TARGET_MS, band),
        ]
    result["targets"] = targets
    r = result
    result["rows"] = [
        {"metric": "request, median ms", "bare": r["bare_ms"], "backend": r["backend_ms"], "addon": r["addon_ms"]},
        {"metric": "ratio vs bare", "bare": 1.0, "backend": r["backend_ratio"], "addon": r["addon_ratio"]},
        {"metric": "overhead ms", "bare": 0.0, "backend": r["backend_overhead_ms"], "addon": r["addon_overhead_ms"]},
        {"metric": "  noise: +- ms (~95%, from run spread)", "backend": r["backend_noise_band_ms"],
         "addon": r["addon_noise_band_ms"]},
        {"metric": "spread of runs (max-min)/median %", **r["spread_pct"]},
        {"metric": "  pipe() / worker encode+denoise+decode ms", "bare": r["bare_pipe_ms"],
         "backend": r["backend_worker_compute_ms"]},
        {"metric": "  PNG save ms", "bare": r["bare_save_ms"], "backend": r["backend_worker_save_ms"]},
        {"metric": "  worker bookkeeping (load check...) ms", "backend": r["backend_worker_bookkeeping_ms"]},
        {"metric": "  worker total ms", "backend": r["backend_worker_total_ms"], "addon": r["addon_worker_total_ms"]},
        {"metric": "  transport: wait - worker total ms", "backend": r["backend_transport_ms"],
         "addon": r["addon_transport_ms"]},
        {"metric": "  Blender: load image, apply, history ms", "addon": r["addon_finish_ms"]},
        {"metric": "  Blender: rest of the operator ms", "addon": r["addon_operator_rest_ms"]},
    ]
    return result
