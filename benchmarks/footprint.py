"""Measurement 4: what the add-on adds to Blender's own process (the worker is a separate process).

VmRSS of the Blender process (bpy as a module) with bpy imported, after enabling the add-on, and after
the warm-up and timed generations of the add-on scenario; and whether torch or diffusers ever loaded.
"""

from __future__ import annotations

from benchmarks.common import Scenarios, target

ADDED_TARGET_MB = 30.0


def measure(scenarios: Scenarios, architecture: str) -> dict:
    addon = scenarios.get("addon", architecture)
    mb = 1024 / 1e6  # KiB -> MB
    result = {
        "generations": len(addon["walls"]) + 1,
        "rss_before_mb": round(addon["rss_before_kib"] * mb, 1),
        "rss_enabled_mb": round(addon["rss_enabled_kib"] * mb, 1),
        "rss_after_mb": round(addon["rss_after_kib"] * mb, 1),
        "added_mb": round((addon["rss_after_kib"] - addon["rss_before_kib"]) * mb, 1),
        "torch_loaded": addon["torch_loaded"],
        "diffusers_loaded": addon["diffusers_loaded"],
    }
    result["targets"] = [
        target(f"add-on adds <= {ADDED_TARGET_MB:g} MB to Blender", result["added_mb"], ADDED_TARGET_MB),
        target("torch not in Blender's sys.modules (1 = loaded)", int(result["torch_loaded"]), 0),
    ]
    result["rows"] = [
        {"metric": "Blender RSS MB: bpy / enabled / after", "addon":
         f"{result['rss_before_mb']} / {result['rss_enabled_mb']} / {result['rss_after_mb']}"},
        {"metric": "added by the add-on MB", "addon": result["added_mb"]},
        {"metric": "torch in Blender's sys.modules", "addon": result["torch_loaded"]},
    ]
    return result
