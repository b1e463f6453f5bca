"""Measurement 3: cold start to the first image, and "click" to first image after an early start.

- bare: from just before the parent spawns `python -m benchmarks.bare` to its first PNG on disk
  (interpreter, torch/diffusers imports, from_pretrained, one image).
- backend: BackendClient.start() (spawn, imports, handshake), then generate (load + one image).
- early start: the worker was spawned and sent load_model ahead of time; the generate request is
  timed from the click. It is compared with bare's first image after from_pretrained (the first call
  of a freshly loaded pipeline), the same work with nothing left to hide.
The OS file cache holds the weights for both sides (the model was just built or used).
"""

from __future__ import annotations

from benchmarks.common import Scenarios, target

EARLY_RATIO_TARGET = 1.05


def measure(scenarios: Scenarios, architecture: str) -> dict:
    bare = scenarios.get("bare", architecture)
    client = scenarios.get("client", architecture)
    cold, early = client["cold"], client["early"]
    bare_first_after_load = bare["first_image_at"] - bare["loaded_at"]
    click = early["click"]["wall"]
    result = {
        "bare_cold_s": bare["first_image_at"] - bare["spawned_at"],
        "bare_interpreter_s": bare["started_at"] - bare["spawned_at"],
        "bare_import_s": bare["imported_at"] - bare["started_at"],
        "bare_load_s": bare["loaded_at"] - bare["imported_at"],
        "bare_first_image_s": bare_first_after_load,
        "backend_cold_s": cold["first_image_at"] - cold["start"],
        "backend_spawn_handshake_s": cold["handshake_at"] - cold["start"],
        "backend_load_s": cold["run"]["timings"]["load"],
        "backend_first_image_s": cold["first_image_at"] - cold["handshake_at"] - cold["run"]["timings"]["load"],
        "early_spawn_to_loaded_s": early["loaded_at"] - early["spawn"],
        "early_click_to_image_s": click,
        "early_ratio": click / bare_first_after_load,
    }
    result = {k: round(v, 4) for k, v in result.items()}
    result["backend_cold_ratio"] = round(result["backend_cold_s"] / result["bare_cold_s"], 4)
    result["targets"] = [  # one sample per side: no noise band, see the warm runs' spread
        target(f"early-start click to first image <= {EARLY_RATIO_TARGET}x bare first image", result["early_ratio"],
               EARLY_RATIO_TARGET)
    ]
    result["rows"] = [
        {"metric": "cold: start to first image s", "bare": result["bare_cold_s"], "backend": result["backend_cold_s"],
         "ratio": result["backend_cold_ratio"]},
        {"metric": "  process start + imports (+handshake) s", "bare": round(result["bare_interpreter_s"]
         + result["bare_import_s"], 4), "backend": result["backend_spawn_handshake_s"]},
        {"metric": "  load s", "bare": result["bare_load_s"], "backend": result["backend_load_s"]},
        {"metric": "  first image s", "bare": result["bare_first_image_s"], "backend": result["backend_first_image_s"]},
        {"metric": "early start: click to first image s", "bare": result["bare_first_image_s"],
         "backend": result["early_click_to_image_s"], "ratio": result["early_ratio"]},
    ]
    return result
