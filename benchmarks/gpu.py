"""`python -m benchmarks --gpu [--only sd15|sdxl] [--steps N] [--compile] [--out FILE]`

The GPU path side by side on one CUDA GPU: SD 1.5 at 512 px (25 steps) and SDXL at 1024 px (30 steps), real
architectures with seeded random weights built on the GPU from the shipped configs (backend/configs; no downloads).
Each model runs default diffusers (fp16, its default attention, AttnProcessor2_0 = SDPA) and ours (run_txt2img, the
worker's pipeline) with one option at a time: fp16, channels_last, Speed fast (cached U-Net steps), VAE tiling, bf16,
and torch.compile with --compile (it compiles for minutes, so it is opt-in). Both sides use the same request (Euler
Ancestral, guidance 7.5, seed 1234). Per run: it/s (denoising steps after the first, synchronised at each step end),
time per image (prompt to PIL picture), peak VRAM (torch.cuda.max_memory_allocated, reset per variant), and the
mean pixel difference to ours fp16. Ratios are to the default diffusers run measured in the same process. JSON goes
to benchmarks/results/gpu-<date>.json. Without CUDA it refuses (exit code 2). Random weights: the images are noise,
and the differences between variants are exaggerated against real weights.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import REPO, REQUEST, RESULTS

MODELS = {"sd15": {"config": "sd15", "size": 512, "steps": 25}, "sdxl": {"config": "sdxl", "size": 1024, "steps": 30}}
RUNS = 3  # timed images per variant, after one warm-up image
NO_CUDA_EXIT = 2


@dataclass(frozen=True)
class Variant:
    name: str
    ours: bool = True  # run_txt2img with these options; False: the default diffusers pipeline call
    dtype: str = "fp16"
    channels_last: bool = False
    speed: str = "off"
    vae_tiling: bool = False  # our exact tiled decode (backend/vae_tiles.py), 256 px tiles: its cost at this size
    compile: bool = False


BASELINE = Variant("diffusers fp16 (default)", ours=False)
REFERENCE = "ours fp16"  # the image the other variants are compared with
# Same-dtype variants first: a pipeline is rebuilt only when the precision changes or after compile.
VARIANTS = (
    BASELINE,
    Variant(REFERENCE),
    Variant("ours fp16 channels_last", channels_last=True),
    Variant("ours fp16 speed fast", speed="fast"),
    Variant("ours fp16 vae_tiling", vae_tiling=True),
    Variant("ours bf16", dtype="bf16"),
)
COMPILED = Variant("ours fp16 compile", compile=True)


def step_count(text: str) -> int:
    """At least 2: it/s is timed from the first step's end (step 1 holds the set-up)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (it/s is timed after the first step), got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --gpu", description=__doc__.split("\n\n")[1])
    parser.add_argument("--only", choices=MODELS, help="one model (default: both)")
    parser.add_argument("--steps", type=step_count, help="denoising steps (default: 25 for sd15, 30 for sdxl)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the U-Net (minutes per model)")
    parser.add_argument("--out", type=Path, help="JSON file to write (default: benchmarks/results/gpu-<date>.json)")
    return parser.parse_args(argv)


def random_pipeline(config: str, device: str, dtype: str):
    """The family's txt2img pipeline with seeded random weights from backend/configs/<config>, built on `device`."""
    import torch

    from backend.families import family_of_class_name
    from backend.models import TORCH_DTYPES
    from backend.single_file import CONFIG_ROOT, tokenizers

    folder = CONFIG_ROOT / config
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    components: dict = tokenizers(folder)
    torch.manual_seed(0)
    for name, (library, class_name) in ((k, v) for k, v in index.items() if isinstance(v, list)):
        if name in components:
            continue
        if library is None:
            components[name] = None  # the safety checker and feature extractor SD 1.5 has not
            continue
        cls = getattr(importlib.import_module(library), class_name)
        if name == "scheduler":  # its tables stay on the CPU, as from_pretrained leaves them (numpy reads them)
            components[name] = cls.from_config(cls.load_config(folder / name))
            continue
        with torch.device(device):  # weights initialised on the GPU: seconds, not minutes on the CPU
            if library == "transformers":
                components[name] = cls(cls.config_class.from_pretrained(folder / name))
            else:
                components[name] = cls.from_config(cls.load_config(folder / name))
    family = family_of_class_name(index["_class_name"])
    pipe = family.txt2img(**{**components, **family.pipeline_kwargs}).to(dtype=TORCH_DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request(model: str, steps: int, size: int, variant: Variant):
    from sdtex_contract.protocol import GenerateParams

    return GenerateParams(
        model=model, output_dir="/unused", prompt=REQUEST["prompt"], seed=REQUEST["seed"], steps=steps,
        guidance_scale=REQUEST["guidance_scale"], width=size, height=size, scheduler=REQUEST["scheduler"],
        speed=variant.speed, vae_tiling=variant.vae_tiling,
    )  # fmt: skip


def one_image(pipe, params, ours: bool, device: str) -> tuple[float, list[float], object]:
    """Seconds from the call to the PIL picture, the step-end times (synchronised), and the picture."""
    import torch

    from backend.steps import cpu_generators
    from backend.tasks.txt2img import run_txt2img

    stamps: list[float] = []

    def stamp() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    if ours:
        image = run_txt2img(pipe, params, on_step=lambda *_: stamp(), device=torch.device(device)).images[0]
    else:
        image = pipe(
            params.prompt, num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
            width=params.width, height=params.height, generator=cpu_generators([params.seed])[0],
            callback_on_step_end=lambda pipeline, i, t, tensors: stamp() or tensors,
        ).images[0]  # fmt: skip
    return time.perf_counter() - start, stamps, image


def run_variant(pipe, variant: Variant, model: str, steps: int, size: int, device: str, runs: int) -> dict:
    """One variant: its options on, a warm-up and `runs` timed images, its options off again."""
    import numpy as np
    import torch

    from backend import vae_tiles
    from backend.models import LoadedModel, ModelKey, ModelSource, configure, place

    # 1. Options on: ours through the worker's own placement and per-request configuration
    params = request(model, steps, size, variant)
    key = ModelKey(ModelSource("folder", model, True), device, variant.dtype, False, variant.channels_last)
    if variant.ours:
        place(pipe, device, False, channels_last=variant.channels_last, compile=variant.compile)
        configure(LoadedModel(pipe, key, torch.device(device)), params)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # 2. A warm-up (and, with compile, the compilation), then the timed images
    warmup_seconds = one_image(pipe, params, variant.ours, device)[0]
    seconds, rates = [], []
    for _ in range(runs):
        elapsed, stamps, image = one_image(pipe, params, variant.ours, device)
        seconds.append(elapsed)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    # 3. Options off, so the next variant starts from the pipeline as built
    if variant.channels_last:
        pipe.unet.to(memory_format=torch.contiguous_format)
    if variant.vae_tiling:
        pipe.vae.disable_tiling()
        vae_tiles.set_tiled(pipe.vae, False)
    return {
        **asdict(variant),
        "it_per_s": round(float(np.median(rates)), 3),
        "seconds_per_image": round(float(np.median(seconds)), 4),
        "warmup_seconds": round(warmup_seconds, 3),
        "peak_vram_gib": None if peak is None else round(peak, 3),
        "samples_s": [round(s, 4) for s in seconds],
        "image": np.asarray(image, dtype=np.float32),
    }


def measure_model(
    build: Callable[[str], object], variants: tuple[Variant, ...], model: str, steps: int, size: int, device: str,
    runs: int = RUNS,
) -> list[dict]:
    """Every variant on pipelines from build(dtype), rebuilt when the precision changes and after a compile; each
    row with its ratios to the first (the baseline) and its pixel difference to REFERENCE."""
    import torch

    from backend.schedulers import make_scheduler

    rows, pipe, built = [], None, None
    for variant in variants:
        if pipe is None or built != variant.dtype:
            pipe = None  # the previous weights go before the next are built: one model's VRAM at a time
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            pipe, built = build(variant.dtype), variant.dtype
            pipe.scheduler = make_scheduler(REQUEST["scheduler"], pipe.scheduler.config)  # both sides: one sampler
            print(f"{model}: built {variant.dtype} pipeline", file=sys.stderr, flush=True)
        rows.append(run_variant(pipe, variant, model, steps, size, device, runs))
        print(f"{model}: {variant.name}: {rows[-1]['it_per_s']} it/s", file=sys.stderr, flush=True)
        if variant.compile:
            pipe = None  # a compiled U-Net stays compiled: nothing runs on it after
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    base = rows[0]
    reference = next((row["image"] for row in rows if row["name"] == REFERENCE), base["image"])
    for row in rows:
        row["speedup_it_s"] = round(row["it_per_s"] / base["it_per_s"], 3)
        row["speedup_image"] = round(base["seconds_per_image"] / row["seconds_per_image"], 3)
        vram, base_vram = row["peak_vram_gib"], base["peak_vram_gib"]
        row["vram_ratio"] = None if vram is None or not base_vram else round(vram / base_vram, 3)
        row["mean_abs_diff_to_fp16"] = round(float(abs(row.pop("image") - reference).mean()), 3)
    return rows


def print_table(results: dict) -> None:
    header = f"{'model':<6} {'variant':<26}{'it/s':>8}{'s/image':>9}{'VRAM GiB':>10}{'x it/s':>8}{'x image':>8}"
    print(header + f"{'x VRAM':>8}{'diff':>7}")
    print("-" * (len(header) + 15))
    for model, rows in results.items():
        for r in rows:
            vram = "-" if r["peak_vram_gib"] is None else f"{r['peak_vram_gib']:.2f}"
            ratio = "-" if r["vram_ratio"] is None else f"{r['vram_ratio']:.2f}"
            print(f"{model:<6} {r['name']:<26}{r['it_per_s']:>8.2f}{r['seconds_per_image']:>9.3f}{vram:>10}"
                  f"{r['speedup_it_s']:>8.2f}{r['speedup_image']:>8.2f}{ratio:>8}{r['mean_abs_diff_to_fp16']:>7.2f}")
    print("x: ratio to the default diffusers run of the same model (higher is faster; VRAM: lower is less); "
          "diff: mean |pixel - ours fp16| in 0..255 (random weights exaggerate it)")


def gpu_report(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "vram_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(0)), "bf16": torch.cuda.is_bf16_supported()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"python -m benchmarks --gpu needs a CUDA GPU: torch {torch.__version__} ({build}) sees none here. "
              "Run it on a machine with an NVIDIA GPU (tools/gpu_check.sh runs it with the GPU tests).",
              file=sys.stderr)  # fmt: skip
        return NO_CUDA_EXIT
    from benchmarks.__main__ import python_name, versions

    variants = VARIANTS + ((COMPILED,) if args.compile else ())
    given = sys.argv[1:] if argv is None else argv
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join([python_name(), "-m", "benchmarks", "--gpu", *given]),
        "gpu": gpu_report(torch), "versions": versions(), "runs": RUNS, "request": REQUEST, "results": {},
    }  # fmt: skip
    for model in [args.only] if args.only else list(MODELS):
        spec = MODELS[model]
        steps = args.steps or spec["steps"]
        report["results"][model] = measure_model(
            lambda dtype, config=spec["config"]: random_pipeline(config, "cuda", dtype),
            variants, model, steps, spec["size"], "cuda",
        )  # fmt: skip
    print_table(report["results"])
    out = args.out or RESULTS / f"gpu-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.resolve().is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
