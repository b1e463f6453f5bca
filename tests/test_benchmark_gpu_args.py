"""The GPU path on the CPU: `python -m benchmarks --gpu`'s arguments and refusal, its harness on the tiny model, the
memory plan's choices, channels_last and compile as the worker applies them and keys the warm model by them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from backend.memory_plan import GIB, plan_memory
from backend.models import ModelManager
from backend.schedulers import make_scheduler
from backend.steps import cpu_generators, denoise, encode_prompt
from benchmarks import gpu
from benchmarks.__main__ import main as benchmarks_main
from benchmarks.common import REPO
from sdtex_contract import protocol
from sdtex_contract.protocol import GenerateParams, ProtocolError

# --- arguments and the refusal without CUDA ---------------------------------------------------------------


def test_defaults_and_each_option(tmp_path):
    args = gpu.parse_args([])
    assert (args.only, args.steps, args.compile, args.out) == (None, None, False, None)
    args = gpu.parse_args(["--only", "sdxl", "--steps", "5", "--compile", "--out", str(tmp_path / "g.json")])
    assert (args.only, args.steps, args.compile, args.out) == ("sdxl", 5, True, tmp_path / "g.json")
    assert {"sd15": (512, 25), "sdxl": (1024, 30)} == {k: (v["size"], v["steps"]) for k, v in gpu.MODELS.items()}


@pytest.mark.parametrize(
    ("argv", "says"),
    [(["--steps", "1"], "--steps: must be at least 2 (it/s is timed after the first step), got 1"),
     (["--steps", "x"], "--steps: invalid"),
     (["--only", "sd3"], "--only: invalid choice: 'sd3'"), (["--colour"], "unrecognized arguments: --colour")],
)  # fmt: skip
def test_bad_arguments_are_argparse_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as exited:
        benchmarks_main(["--gpu", *argv])  # through the suite's entry, as typed
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_refuses_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a machine with one
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--gpu", "--only", "sd15"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == gpu.NO_CUDA_EXIT == 2
    assert "python -m benchmarks --gpu needs a CUDA GPU" in done.stderr and "tools/gpu_check.sh" in done.stderr
    assert "wrote" not in done.stdout  # refused before measuring anything


# --- the harness, on the CPU with the tiny model ----------------------------------------------------------


def test_harness_compares_like_with_like(tiny_model_dir):
    """Ours with no option is diffusers' own picture, bit for bit (the request is the same on both sides); an option
    changes the row it is on and is undone before the next (the last row repeats the first of ours)."""
    from diffusers import StableDiffusionPipeline

    def build(dtype: str):
        assert dtype == "fp32"
        pipe = StableDiffusionPipeline.from_pretrained(
            tiny_model_dir, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    variants = (gpu.Variant("diffusers", ours=False, dtype="fp32"), gpu.Variant(gpu.REFERENCE, dtype="fp32"),
                gpu.Variant("cl", dtype="fp32", channels_last=True), gpu.Variant("fast", dtype="fp32", speed="fast"),
                gpu.Variant("again", dtype="fp32"))  # fmt: skip
    rows = gpu.measure_model(build, variants, "tiny", steps=6, size=64, device="cpu", runs=1)
    diffs = {row["name"]: row["mean_abs_diff_to_fp16"] for row in rows}
    assert diffs["diffusers"] == 0 and diffs["again"] == 0
    assert diffs["cl"] < 0.5  # channels_last: the same picture up to float rounding
    assert diffs["fast"] > 0  # cached steps change details
    assert rows[0]["speedup_it_s"] == rows[0]["speedup_image"] == 1 and rows[0]["vram_ratio"] is None
    assert all(row["it_per_s"] > 0 and row["peak_vram_gib"] is None for row in rows)


# --- the memory plan ----------------------------------------------------------------------------------------

SDXL_WEIGHTS, SD_WEIGHTS = int(6.5 * GIB), 2 * GIB  # fp16 sizes of SDXL's and SD 1.5's components
RANK = {(False, False): 0, (False, True): 1, (True, True): 2}  # all on the GPU < VAE tiles < model offload


def ladder(family: str, weights: int, size: int, **kw) -> list:
    return [plan_memory(gib * GIB // 4, weights, family, size, size, **kw) for gib in range(320, 0, -1)]


def test_plenty_of_vram_changes_nothing():
    for family, weights, size in (("sd", SD_WEIGHTS, 512), ("sdxl", SDXL_WEIGHTS, 1024)):
        plan = plan_memory(80 * GIB, weights, family, size, size, bf16_supported=True)
        assert (plan.cpu_offload, plan.vae_tiling, plan.dtype, plan.fits) == (False, False, "fp16", True)
        assert weights < plan.needed_bytes < 80 * GIB


def test_less_vram_tiles_first_then_offloads():
    plans = ladder("sd", SD_WEIGHTS, 2048)  # a 2K texture: the decode is the peak
    ranks = [RANK[(p.cpu_offload, p.vae_tiling)] for p in plans]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2}  # every rung, in order, never back
    assert all(p.dtype == "fp16" for p in plans)  # SD's VAE decodes in fp16: bf16 saves nothing
    assert plans[-1].cpu_offload and not plans[-1].fits and "may not fit" in plans[-1].advice()
    assert all(p.fits for p in plans if not p.cpu_offload)


def test_bf16_spares_sdxl_the_fp32_decode():
    with_bf16, without = ladder("sdxl", SDXL_WEIGHTS, 1024, bf16_supported=True), ladder("sdxl", SDXL_WEIGHTS, 1024)
    rank = [RANK[(p.cpu_offload, p.vae_tiling)] for p in with_bf16]
    rank_fp16 = [RANK[(p.cpu_offload, p.vae_tiling)] for p in without]
    assert all(a <= b for a, b in zip(rank, rank_fp16, strict=True))  # bf16 never needs a costlier rung
    spared = [i for i, p in enumerate(with_bf16) if p.dtype == "bf16" and rank[i] < rank_fp16[i] and p.fits]
    assert spared  # some VRAM where bf16 runs all on the GPU and fp16 (an fp32 decode) must offload or tile
    assert all(p.dtype == "fp16" for p in without)
    assert all(p.dtype == "fp16" for p in with_bf16 if p.needed_bytes <= p.free_bytes // 2)  # room: no change


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family must be one of sd, sdxl, got 'flux'"):
        plan_memory(GIB, GIB, "flux", 512, 512)


# --- channels_last, compile and SDPA on the worker's warm model ---------------------------------------------


def params_for(model, **changes) -> GenerateParams:
    changes = {"device": "cpu", **changes}  # also on a GPU machine: these are the CPU checks
    return GenerateParams(model=str(model), prompt="oak planks", output_dir="/unused", **changes)


def latents_of(pipe) -> torch.Tensor:
    embeds = encode_prompt(pipe, params_for("x"), True, torch.device("cpu"))
    scheduler = make_scheduler("ddim", pipe.scheduler.config)
    return denoise(pipe, scheduler, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                   generator=cpu_generators([5]), **embeds)  # fmt: skip


def is_channels_last(pipe) -> bool:
    return pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_keys_the_warm_model_and_keeps_the_picture(tiny_model_dir):
    manager = ModelManager()
    plain, seconds = manager.get(params_for(tiny_model_dir))  # auto: off on the CPU
    assert seconds > 0 and not plain.key.channels_last and not is_channels_last(plain.pipe)
    reference = latents_of(plain.pipe)
    again, seconds = manager.get(params_for(tiny_model_dir, channels_last="off"))
    assert again is plain and seconds == 0  # "off" is what auto is here: still warm
    last, seconds = manager.get(params_for(tiny_model_dir, channels_last="on"))
    assert last is not plain and seconds > 0 and last.key.channels_last and is_channels_last(last.pipe)
    assert (latents_of(last.pipe) - reference).abs().max().item() < 1e-4
    back, seconds = manager.get(params_for(tiny_model_dir, channels_last="auto"))
    assert seconds > 0 and not is_channels_last(back.pipe)


def test_compile_is_refused_on_the_cpu_before_loading(tiny_model_dir):
    manager = ModelManager()
    with pytest.raises(ProtocolError) as refused:
        manager.get(params_for(tiny_model_dir, compile=True))
    error = refused.value
    assert error.code == protocol.INVALID_PARAMS and error.data["param"] == "compile"
    assert "compile needs a CUDA device, this request runs on cpu" in error.message
    assert manager.loaded is None


def test_sdpa_by_default_and_slicing_replaces_it(tiny_model_dir):
    manager = ModelManager()
    model, _ = manager.get(params_for(tiny_model_dir))
    kinds = {type(p).__name__ for p in model.pipe.unet.attn_processors.values()}
    assert kinds == {"AttnProcessor2_0"}  # torch.nn.functional.scaled_dot_product_attention
    manager.get(params_for(tiny_model_dir, attention_slicing=True))
    assert {type(p).__name__ for p in model.pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}


@pytest.mark.skipif(os.environ.get("SDTEX_GPU") != "1", reason="set SDTEX_GPU=1 on a machine with CUDA")
def test_gpu_channels_last_by_default_and_the_memory_advice(tiny_model_dir):
    manager = ModelManager()
    model, _ = manager.get(params_for(tiny_model_dir, device="cuda"))
    assert model.key.dtype == "fp16" and model.key.channels_last and is_channels_last(model.pipe)
    assert model.memory_advice.startswith("memory plan: dtype fp16, cpu_offload off, vae_tiling off")
    off, seconds = manager.get(params_for(tiny_model_dir, device="cuda", channels_last="off"))
    assert seconds > 0 and not is_channels_last(off.pipe)
