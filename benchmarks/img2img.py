"""Measurement: img2img, ours against diffusers' own img2img pipeline, in the same process and run.

One fresh process loads the model as the worker does (ModelManager) and takes turns, rotating who goes
first each round, between three sides on the same warm weights:
- backend: the task's `run_img2img` on `model.pipeline("img2img")` (from_pipe), to PIL pictures;
- bare: diffusers' StableDiffusionImg2ImgPipeline (built with from_pipe from the same loaded components)
  called as its documentation shows, with the same sampler, seed, strength and picture, to PIL;
- txt2img: the task's `run_txt2img` with the same steps, for the cost model: img2img at strength s should
  cost about s x the txt2img denoise time plus one VAE encode (its decode is the same as txt2img's).
The first run of each side is a warm-up and is left out. Both img2img sides must give identical pixels.

`python -m benchmarks --only img2img_sd15` (or img2img_tiny); the parent spawns
`python -m benchmarks.img2img CONFIG OUT` and reads its JSON (the parent never imports torch).
"""

from __future__ import annotations

import json
import sys

from benchmarks.common import (
    REQUEST,
    RUNS_FACTOR,
    Scenarios,
    difference_band,
    measuring_process,
    median,
    median_error,
    model_dir,
    now,
    scenario_args,
    target,
)

RATIO_TARGET = 1.02
STRENGTH = 0.5
SETTINGS = {  # steps x strength = 2 denoising steps
    "tiny": {"width": 64, "height": 64, "steps": 4},
    "sd15": {"width": 256, "height": 256, "steps": 4},
}


def ms(values: list[float]) -> float:
    return round(1000 * median(values), 2)


def measure(scenarios: Scenarios, architecture: str) -> dict:
    config = {
        "architecture": architecture,
        "model": str(model_dir(architecture)),
        "runs": scenarios.runs * RUNS_FACTOR[architecture],
    }
    return summarise(measuring_process(["benchmarks.img2img"], config, scenarios.scratch, f"img2img-{architecture}"))


def summarise(raw: dict) -> dict:
    ours = [r["wall"] for r in raw["backend"]]
    bare = [r["wall"] for r in raw["bare"]]
    # Each round runs both sides back to back: the ratio within a round cancels slow drifts in machine load.
    paired = [o / b for o, b in zip(ours, bare, strict=True)]
    txt2img_denoise = median([r["timings"]["denoise"] for r in raw["txt2img"]])
    stages = {key: median([r["timings"][key] for r in raw["backend"]]) for key in ("encode", "encode_image",
                                                                                   "denoise", "decode")}  # fmt: skip
    strength = raw["denoising_steps"] / raw["steps"]
    # The cost model: img2img = prompt encode + s x txt2img denoise + one VAE encode + decode.
    predicted = stages["encode"] + strength * txt2img_denoise + stages["encode_image"] + stages["decode"]
    result = {
        "runs": len(ours),
        "settings": {k: raw[k] for k in ("width", "height", "steps", "strength", "denoising_steps", "scheduler")},
        "bare_ms": ms(bare),
        "backend_ms": ms(ours),
        "ratio": round(median(ours) / median(bare), 4),
        "noise_band_ms": round(1000 * difference_band(bare, ours), 2),
        "paired_ratio": round(median(paired), 4),
        "paired_band": round(2 * median_error(paired), 4),
        "backend_stages_ms": {key: round(1000 * value, 2) for key, value in stages.items()},
        "txt2img_denoise_ms": round(1000 * txt2img_denoise, 2),
        "denoise_vs_s_x_txt2img": round(stages["denoise"] / (strength * txt2img_denoise), 4),
        "predicted_ms": round(1000 * predicted, 2),
        "measured_vs_predicted": round(median(ours) / predicted, 4),
        "same_pixels": raw["same_pixels"],
        "samples_ms": {"bare": [round(1000 * w, 2) for w in bare], "backend": [round(1000 * w, 2) for w in ours]},
    }
    band = result["noise_band_ms"] / result["bare_ms"]
    result["targets"] = [
        target(f"img2img vs diffusers img2img <= {RATIO_TARGET}", result["ratio"], RATIO_TARGET, band),
        target(f"  same, paired by round <= {RATIO_TARGET}", result["paired_ratio"], RATIO_TARGET,
               result["paired_band"]),
    ]  # fmt: skip
    result["rows"] = [
        {"metric": "img2img request, median ms", "bare": result["bare_ms"], "backend": result["backend_ms"],
         "ratio": result["ratio"]},
        {"metric": "  noise: +- ms (~95%, from run spread)", "backend": result["noise_band_ms"]},
        {"metric": "  median of per-round ratios (+- ~95%)", "backend": f"+- {result['paired_band']}",
         "ratio": result["paired_ratio"]},
        {"metric": "  backend: encode_image / denoise ms", "backend":
            f"{result['backend_stages_ms']['encode_image']} / {result['backend_stages_ms']['denoise']}"},
        {"metric": f"txt2img denoise ms ({raw['steps']} steps)", "backend": result["txt2img_denoise_ms"]},
        {"metric": f"img2img denoise / (s={strength:g} x txt2img)", "ratio": result["denoise_vs_s_x_txt2img"]},
        {"metric": "img2img vs s x txt2img + encode (model)", "backend": result["predicted_ms"],
         "ratio": result["measured_vs_predicted"]},
        {"metric": "same pixels (backend = bare)", "backend": str(result["same_pixels"])},
    ]  # fmt: skip
    return result


# --- the measuring process ------------------------------------------------------------------------------


def main() -> None:
    config, out = scenario_args()
    import hashlib

    import numpy as np
    import PIL.Image
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from backend.models import ModelManager
    from backend.steps import denoising_steps
    from backend.tasks.img2img import run_img2img
    from backend.tasks.txt2img import run_txt2img
    from sdtex_contract import protocol

    settings = SETTINGS[config["architecture"]]
    common = {"model": config["model"], "output_dir": "/unused", **REQUEST, **settings}
    txt2img_params = protocol.GenerateParams.from_dict(common)
    img2img_params = protocol.Img2ImgParams.from_dict(
        {**common, "image": {"path": "/unused.png"}, "strength": STRENGTH, "resize": "keep"}
    )
    model, _ = ModelManager().get(txt2img_params)
    ours = model.pipeline("img2img")
    bare = StableDiffusionImg2ImgPipeline.from_pipe(model.pipe)  # diffusers' own, on the same weights
    bare.set_progress_bar_config(disable=True)
    bare.scheduler = EulerAncestralDiscreteScheduler.from_config(model.pipe.scheduler.config)
    # A picture with structure (not noise), at the request's size.
    y, x = np.mgrid[0 : settings["height"], 0 : settings["width"]]
    picture = PIL.Image.fromarray(
        np.stack([128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), (x + y) % 256], -1).astype(np.uint8)
    )

    def run_backend() -> dict:
        start = now()
        output = run_img2img(ours, img2img_params, picture, device=model.device)
        wall = now() - start
        digest = hashlib.sha256(output.images[0].tobytes()).hexdigest()
        return {"wall": wall, "timings": output.timings, "sha256": digest}

    def run_bare() -> dict:
        start = now()
        image = bare(
            REQUEST["prompt"],
            image=picture,
            strength=STRENGTH,
            num_inference_steps=settings["steps"],
            guidance_scale=REQUEST["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]),
        ).images[0]
        return {"wall": now() - start, "sha256": hashlib.sha256(image.tobytes()).hexdigest()}

    def run_txt2img_side() -> dict:
        start = now()
        output = run_txt2img(model.pipe, txt2img_params, device=model.device)
        return {"wall": now() - start, "timings": output.timings}

    sides = {"backend": run_backend, "bare": run_bare, "txt2img": run_txt2img_side}
    for side in sides.values():  # warm-up, left out
        side()
    runs = {name: [] for name in sides}
    order = list(sides)
    for i in range(config["runs"]):
        print(f"img2img round {i + 1}/{config['runs']} ...", file=sys.stderr, flush=True)
        for name in order[i % 3 :] + order[: i % 3]:
            runs[name].append(sides[name]())
    hashes = {r["sha256"] for r in runs["backend"] + runs["bare"]}
    out.write_text(
        json.dumps({
            **runs,
            **settings,
            "strength": STRENGTH,
            "denoising_steps": denoising_steps(settings["steps"], STRENGTH),
            "scheduler": REQUEST["scheduler"],
            "same_pixels": len(hashes) == 1,
            "torch_threads": torch.get_num_threads(),
        })
    )


if __name__ == "__main__":
    main()
