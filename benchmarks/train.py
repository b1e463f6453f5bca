"""Measurement: DreamBooth-LoRA training steps per second, ours (the train_lora task) against diffusers' own
example script (examples/dreambooth/train_dreambooth_lora.py, copied unmodified into benchmarks/third_party/)
with the same settings, side by side in one run: same model, 25 synthetic photos, resolution, batch 1, rank 4,
learning rate 1e-4, seed 0, centre crop, fp32 on the CPU (mixed precision fp16 on a GPU).

Each side runs in its own fresh process, one after the other, and records when each optimizer step ends (ours:
the job's progress events; the example: its tqdm progress bar's updates) and the process's peak resident memory
(VmHWM) at its last step, before the example reloads a pipeline for its final save and validation. The first
step of each side is a warm-up and is left out; a side's time per step is the median of the others.

Differences in the work per step: ours samples each step's latent from the photo's latent distribution encoded
once (the example encodes the photo with the VAE every step) and encodes the prompt once (the example's
--pre_compute_text_embeddings, off by default: it runs the text encoder every step). The example's data
pipeline needs torchvision, which has no CPU wheel for this torch build offline: a stand-in for its five
transforms (benchmarks/third_party/torchvision_shim) is put on the path after transformers and peft have
checked for torchvision; it runs only in the data loader.

`python -m benchmarks --only train_sd15` (or train_tiny); the parent spawns
`python -m benchmarks.train SIDE CONFIG OUT` per side and reads its JSON (the parent never imports torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import (
    REPO,
    Scenarios,
    measuring_process,
    median,
    median_error,
    model_dir,
    now,
    target,
)

RATIO_TARGET = 1.0  # our seconds per step / the example's, at most (steps per second at least the example's)
SETTINGS = {
    "tiny": {"resolution": 64, "steps": 12},
    "sd15": {"resolution": 256, "steps": 6},
}
COMMON = {"batch_size": 1, "rank": 4, "learning_rate": 1e-4, "seed": 0, "prompt": "a photo of sks wood"}
PHOTOS = 25
EXAMPLE = REPO / "benchmarks" / "third_party" / "train_dreambooth_lora.py"
SHIM = REPO / "benchmarks" / "third_party" / "torchvision_shim"
SIDES = ("example", "backend")


def write_photos(folder: Path) -> Path:
    """25 photos: a coloured disc or square on a coloured ground, each its own size and aspect (PNG)."""
    import random

    import PIL.Image
    import PIL.ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(PHOTOS):
        rng = random.Random(i)
        width, height = rng.randint(300, 700), rng.randint(300, 700)
        image = PIL.Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
        shape = PIL.ImageDraw.Draw(image).ellipse if i % 2 else PIL.ImageDraw.Draw(image).rectangle
        shape((width // 5, height // 5, width // 2, height // 2), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        image.save(folder / f"photo{i:02d}.png")
    return folder


def measure(scenarios: Scenarios, architecture: str) -> dict:
    photos = write_photos(scenarios.scratch / "train-photos")
    raw = {}
    for side in SIDES:
        config = {"architecture": architecture, "model": str(model_dir(architecture)), "photos": str(photos),
                  "output_dir": str(scenarios.scratch / f"train-{side}-{architecture}"), **COMMON,
                  **SETTINGS[architecture]}  # fmt: skip
        name = f"train-{side}-{architecture}"
        raw[side] = measuring_process(["benchmarks.train", side], config, scenarios.scratch, name)
    return summarise(raw, SETTINGS[architecture])


def step_times(ends: list[float]) -> list[float]:
    """Seconds of each step after the first (the first, a warm-up, also carries the set-up)."""
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def summarise(raw: dict, settings: dict) -> dict:
    times = {side: step_times(raw[side]["step_ends"]) for side in SIDES}
    per_step = {side: median(times[side]) for side in SIDES}
    ratio = per_step["backend"] / per_step["example"]
    errors = {side: median_error(times[side]) / per_step[side] for side in SIDES}
    band = ratio * (errors["backend"] ** 2 + errors["example"] ** 2) ** 0.5 * 2
    peak = {side: round(raw[side]["peak_rss_kib"] / 2**20, 2) for side in SIDES}
    result = {
        "settings": {**COMMON, **settings, "photos": PHOTOS},
        "steps_per_s": {side: round(1 / per_step[side], 4) for side in SIDES},
        "s_per_step": {side: round(per_step[side], 4) for side in SIDES},
        "step_samples_s": {side: [round(t, 4) for t in times[side]] for side in SIDES},
        "fastest_step_s": {side: round(min(times[side]), 4) for side in SIDES},  # least touched by other load
        "speedup": round(1 / ratio, 4),
        "peak_rss_gib": peak,
        "device": raw["backend"]["device"],
    }
    result["targets"] = [target(f"our s/step / example's <= {RATIO_TARGET} (steps/s >= 1x)", round(ratio, 4),
                                RATIO_TARGET, round(band, 4))]  # fmt: skip
    result["rows"] = [
        {"metric": "training steps per second", "bare": result["steps_per_s"]["example"],
         "backend": result["steps_per_s"]["backend"], "ratio": result["speedup"]},
        {"metric": "  seconds per step (median)", "bare": result["s_per_step"]["example"],
         "backend": result["s_per_step"]["backend"], "ratio": round(ratio, 4)},
        {"metric": "  fastest step, s", "bare": result["fastest_step_s"]["example"],
         "backend": result["fastest_step_s"]["backend"],
         "ratio": round(result["fastest_step_s"]["backend"] / result["fastest_step_s"]["example"], 4)},
        {"metric": "peak memory (VmHWM), GiB", "bare": peak["example"], "backend": peak["backend"],
         "ratio": round(peak["backend"] / peak["example"], 4)},
    ]  # fmt: skip
    return result


# --- the measuring processes ----------------------------------------------------------------------------


def peak_rss_kib() -> int:
    from benchmarks.common import proc_status_kib

    return proc_status_kib("self", "VmHWM")


def run_backend(config: dict) -> dict:
    """Our train_lora job in this process, timed by its progress events."""
    import torch

    from backend.context import JobContext
    from backend.models import ModelManager
    from backend.tasks import train_lora
    from sdtex_contract import protocol

    ends: list[float] = []
    peak = [0]

    def emit(kind: str, data: dict) -> None:
        if kind == protocol.EVENT_PROGRESS and "loss" in data:
            ends.append(now())
            peak[0] = peak_rss_kib()

    params = protocol.TrainLoraParams.from_dict({
        "model": config["model"], "photos_dir": config["photos"], "instance_prompt": config["prompt"],
        "resolution": config["resolution"], "steps": config["steps"], "learning_rate": config["learning_rate"],
        "rank": config["rank"], "batch_size": config["batch_size"], "seed": config["seed"],
        "output_dir": config["output_dir"],
    })  # fmt: skip
    train_lora.run(JobContext("bench", ModelManager(), None, emit=emit), params)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"step_ends": ends, "peak_rss_kib": peak[0], "device": device, "torch_threads": torch.get_num_threads()}


def run_example(config: dict) -> dict:
    """diffusers' example script, unmodified, in this process; its tqdm bar's updates mark the step ends."""
    import runpy

    import peft  # noqa: F401 - their optional-dependency checks run before the torchvision stand-in exists
    import torch
    import transformers  # noqa: F401
    import transformers.image_utils  # noqa: F401
    from tqdm.auto import tqdm

    ends: list[float] = []
    peak = [0]
    update = tqdm.update

    def timed_update(self, n=1):
        result = update(self, n)
        if self.total == config["steps"]:  # the training bar (not a loading bar)
            ends.append(now())
            peak[0] = peak_rss_kib()
        return result

    tqdm.update = timed_update
    sys.path.insert(0, str(SHIM))
    precision = "fp16" if torch.cuda.is_available() else "no"
    sys.argv = [
        str(EXAMPLE), "--pretrained_model_name_or_path", config["model"], "--instance_data_dir", config["photos"],
        "--instance_prompt", config["prompt"], "--output_dir", config["output_dir"],
        "--resolution", str(config["resolution"]), "--center_crop", "--train_batch_size", str(config["batch_size"]),
        "--max_train_steps", str(config["steps"]), "--learning_rate", str(config["learning_rate"]),
        "--rank", str(config["rank"]), "--seed", str(config["seed"]), "--mixed_precision", precision,
        "--checkpointing_steps", "100000", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
    ]  # fmt: skip
    if torch.cuda.is_available():
        sys.argv.append("--gradient_checkpointing")
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"step_ends": ends, "peak_rss_kib": peak[0], "device": device, "torch_threads": torch.get_num_threads()}


def main() -> None:
    side, config, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result = run_backend(config) if side == "backend" else run_example(config)
    if len(result["step_ends"]) != config["steps"]:
        raise RuntimeError(f"{side}: {len(result['step_ends'])} step ends recorded, expected {config['steps']}")
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
