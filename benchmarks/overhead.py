"""Measurement 1: warm overhead per request against bare diffusers (same model, request and seed).

What each side includes, every run timed with the model already loaded:
- bare: `pipe(...)` to a PIL image, plus a plain `image.save(png)` (timed apart: `bare_pipe_ms`).
- backend: submit to terminal reply in a client process (BackendClient): validation, JSON lines both
  ways, progress events, the worker's run and its PNG with metadata.
- add-on: `bpy.ops.sdtex.generate()` in Blender: the above plus parameter checks, loading the image
  into Blender, a new material on the Cube and the history entry.
Ratios and overheads compare medians against bare with the PNG save.
"""

from __future__ import annotations

from benchmarks.common import Scenarios, median

RATIO_TARGET, OVERHEAD_TARGET_MS = 1.02, 20.0


def ms(values: list[float]) -> float:
    return round(1000 * median(values), 2)


def measure(scenarios: Scenarios, architecture: str) -> dict:
    bare = scenarios.get("bare", architecture)
    client = scenarios.get("client", architecture)
    addon = scenarios.get("addon", architecture)
    bare_runs = bare["runs"][1:]  # run 0 is the first image (cold)
    warm = client["warm"]
    worker_compute = [sum(r["timings"][k] for k in ("encode", "denoise", "decode")) for r in warm]
    result = {
        "runs": len(warm),
        "bare_pipe_ms": ms([r["pipe"] for r in bare_runs]),
        "bare_save_ms": ms([r["save"] for r in bare_runs]),
        "bare_ms": ms([r["pipe"] + r["save"] for r in bare_runs]),
        "backend_ms": ms([r["wall"] for r in warm]),
        "backend_worker_total_ms": ms([r["timings"]["total"] for r in warm]),
        "backend_worker_compute_ms": ms(worker_compute),
        "backend_worker_save_ms": ms([r["timings"]["save"] for r in warm]),
        "backend_transport_ms": ms([r["wall"] - r["timings"]["total"] for r in warm]),
        "addon_ms": ms(addon["walls"]),
        "addon_request_ms": ms(addon["run"]),
        "addon_finish_ms": ms(addon["finish"]),
        "addon_applied": addon["applied"],
        # The same seed on both sides must give the same pixels, or the sides did not do the same work.
        "same_pixels": len({r["pixels_sha256"] for r in bare_runs + warm}) == 1,
        "samples_ms": {
            "bare": [round(1000 * (r["pipe"] + r["save"]), 2) for r in bare_runs],
            "backend": [round(1000 * r["wall"], 2) for r in warm],
            "addon": [round(1000 * w, 2) for w in addon["walls"]],
        },
    }
    targets = []
    for side in ("backend", "addon"):
        ratio = result[f"{side}_ms"] / result["bare_ms"]
        overhead = result[f"{side}_ms"] - result["bare_ms"]
        result[f"{side}_ratio"] = round(ratio, 4)
        result[f"{side}_overhead_ms"] = round(overhead, 2)
        targets += [
            {"target": f"{side} warm ratio <= {RATIO_TARGET}", "value": round(ratio, 4), "met": ratio <= RATIO_TARGET},
            {"target": f"{side} warm overhead <= {OVERHEAD_TARGET_MS:g} ms", "value": round(overhead, 2),
             "met": overhead <= OVERHEAD_TARGET_MS},
        ]
    result["targets"] = targets
    result["rows"] = [
        {"metric": "request, median ms", "bare": result["bare_ms"], "backend": result["backend_ms"],
         "addon": result["addon_ms"]},
        {"metric": "ratio vs bare", "bare": 1.0, "backend": result["backend_ratio"], "addon": result["addon_ratio"]},
        {"metric": "overhead ms", "bare": 0.0, "backend": result["backend_overhead_ms"],
         "addon": result["addon_overhead_ms"]},
        {"metric": "pipe / worker compute ms", "bare": result["bare_pipe_ms"],
         "backend": result["backend_worker_compute_ms"]},
        {"metric": "PNG save ms", "bare": result["bare_save_ms"], "backend": result["backend_worker_save_ms"]},
    ]
    return result
