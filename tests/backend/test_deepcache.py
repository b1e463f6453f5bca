"""Cached U-Net steps (backend/deepcache.py, the `speed` parameter): off is diffusers bit for bit, a cached call
is what the U-Net computes with its deep modules forced to their recorded outputs, the deep modules really run
only on full steps, seamless stays exactly tileable, and CFG batches, LoRAs and ControlNet keep working."""

from __future__ import annotations

import numpy as np
import pytest
import test_seamless
import torch
from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
from test_loras import write_twins
from test_parity import assert_same_image, load_twice, params, reference_image
from test_project_task import cameras, cube, depth_of_sphere, request, scene
from torch import nn

from backend import controlnets
from backend.context import Cancelled
from backend.deepcache import SCHEDULES, deep_cache, deep_modules, reuse_deep_features
from backend.families import SD
from backend.inputs import InputStore
from backend.models import ModelManager
from backend.seamless import seamless
from backend.tasks import project
from backend.tasks.txt2img import run_txt2img
from backend.tiny_model import make_test_controlnet
from sdtex_contract.params import SPEEDS
from sdtex_contract.protocol import INVALID_PARAMS, GenerateParams, ProtocolError, model_params


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    return load_twice(tiny_model_dir, SD)


def forwards(unet: nn.Module) -> dict[str, object]:
    """Every module's own forward attribute and hooks: all empty on a model as diffusers loads it."""
    return {
        name: (m.__dict__.get("forward"), dict(m._forward_hooks), dict(m._forward_pre_hooks))
        for name, m in unet.named_modules()
    }


def unet_inputs(unet: UNet2DConditionModel, seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((batch, 4, 16, 16), generator=generator)
    prompt = torch.randn((batch, 7, unet.config.cross_attention_dim), generator=generator)
    return sample, prompt


def test_the_schedules_are_the_contracts_speeds():
    assert tuple(SCHEDULES) == SPEEDS


def test_off_is_bit_identical_to_diffusers_and_fast_is_not(pipes, tiny_model_dir):
    ours, reference = pipes
    before = forwards(ours.unet)
    p = params(tiny_model_dir, scheduler="euler_a", seed=77, steps=4)
    expected = reference_image(reference, p, EulerAncestralDiscreteScheduler, {})
    assert_same_image(run_txt2img(ours, p).images[0], expected)
    fast = np.asarray(
        run_txt2img(ours, params(tiny_model_dir, scheduler="euler_a", seed=77, steps=4, speed="fast")).images[0]
    )
    assert not np.array_equal(fast, np.asarray(expected)), "speed fast changed nothing: no call was cached"
    assert forwards(ours.unet) == before, "a cached run left a patch or a hook on the U-Net"
    assert_same_image(run_txt2img(ours, p).images[0], expected)  # the warm model serves off as loaded


def test_the_unet_is_restored_after_an_exception_and_nesting_is_refused(pipes):
    unet = pipes[0].unet
    before = forwards(unet)
    sample, prompt = unet_inputs(unet, 1)
    with pytest.raises(RuntimeError, match="interrupted"), deep_cache(unet, "faster"), torch.no_grad():
        unet(sample, 900, encoder_hidden_states=prompt)
        with pytest.raises(RuntimeError, match="nesting"), deep_cache(unet, "fast"):
            pass
        raise RuntimeError("interrupted")
    assert forwards(unet) == before


def test_a_cancelled_cached_run_leaves_the_unet_as_loaded(pipes, tiny_model_dir):
    before = forwards(pipes[0].unet)
    steps_done = []
    with pytest.raises(Cancelled):
        run_txt2img(
            pipes[0], params(tiny_model_dir, seed=3, steps=5, speed="fast"),
            on_step=lambda step, total, latents: steps_done.append(step), should_cancel=lambda: len(steps_done) >= 2,
        )  # fmt: skip
    assert steps_done == [1, 2]
    assert forwards(pipes[0].unet) == before


@pytest.mark.parametrize("speed", ["fast", "faster"])
def test_deep_modules_run_on_full_steps_only_and_shallow_ones_every_step(pipes, tiny_model_dir, speed):
    unet, steps = pipes[0].unet, 7
    interval, branch = SCHEDULES[speed]
    deep = deep_modules(unet, branch)
    shallow = [*unet.down_blocks[:branch], *unet.up_blocks[len(unet.up_blocks) - branch :], unet.conv_out]
    assert len(deep) == 3 and len(shallow) == 3  # tiny U-Net: down 1, mid, up 0 deep; down 0, up 1 shallow

    # Which U-Net call each watched layer ran in. The inner layers of a deep module run only when it computes
    # (a hook on the deep module itself would fire on cached calls too).
    calls, ran = [], {"deep": [], "shallow": []}
    handles = [unet.register_forward_pre_hook(lambda *_: calls.append(len(calls)))]
    watched = [*((next(iter(m.resnets)), "deep") for m in deep), *((m, "shallow") for m in shallow)]
    handles += [m.register_forward_hook(lambda *_, key=key: ran[key].append(calls[-1])) for m, key in watched]
    try:
        run_txt2img(pipes[0], params(tiny_model_dir, seed=3, steps=steps, speed=speed))
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == steps  # CFG: one batched U-Net call per step
    full = list(range(0, steps, interval))  # DeepCache's uniform schedule: the first call and every interval-th
    assert 1 < len(full) < steps
    assert sorted(ran["deep"]) == sorted(full * len(deep))
    assert sorted(ran["shallow"]) == sorted(list(range(steps)) * len(shallow))


def control_residuals(unet: UNet2DConditionModel, sample: torch.Tensor, prompt: torch.Tensor, seed: int) -> dict:
    """Random ControlNet-style residuals shaped like the U-Net's skip connections and mid output."""
    shapes = []
    handles = [unet.conv_in.register_forward_hook(lambda m, i, out: shapes.append(out.shape))]
    handles += [
        b.register_forward_hook(lambda m, i, out: shapes.extend(r.shape for r in out[1])) for b in unet.down_blocks
    ]
    handles.append(unet.mid_block.register_forward_hook(lambda m, i, out: shapes.append(out.shape)))
    try:
        unet(sample, 500, encoder_hidden_states=prompt)
    finally:
        for handle in handles:
            handle.remove()
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.randn(shape, generator=generator) for shape in shapes]
    return {"down_block_additional_residuals": tuple(noise[:-1]), "mid_block_additional_residual": noise[-1]}


@pytest.mark.parametrize("controlnet", [False, True])
@torch.no_grad()
def test_a_cached_call_is_the_unet_with_its_deep_modules_forced_to_the_recorded_outputs(pipes, controlnet):
    unet = pipes[0].unet
    (first, prompt), (second, _) = unet_inputs(unet, 1), unet_inputs(unet, 2)
    extra = [control_residuals(unet, first, prompt, seed) if controlnet else {} for seed in (3, 4)]
    deep = deep_modules(unet, 1)

    # Oracle, with forward hooks on the plain U-Net: record the deep outputs of a call at t=900, then replace
    # the deep outputs of a call at t=700 by them (the hooks' return value replaces the module's output).
    recorded: dict[int, object] = {}
    handles = [m.register_forward_hook(lambda m, i, out, k=k: recorded.__setitem__(k, out)) for k, m in enumerate(deep)]
    plain_first = unet(first, 900, encoder_hidden_states=prompt, **extra[0]).sample
    for handle in handles:
        handle.remove()
    handles = [m.register_forward_hook(lambda m, i, out, k=k: recorded[k]) for k, m in enumerate(deep)]
    forced_second = unet(second, 700, encoder_hidden_states=prompt, **extra[1]).sample
    for handle in handles:
        handle.remove()
    plain_second = unet(second, 700, encoder_hidden_states=prompt, **extra[1]).sample

    with reuse_deep_features(unet, 2, 1):
        full = unet(first, 900, encoder_hidden_states=prompt, **extra[0]).sample
        cached = unet(second, 700, encoder_hidden_states=prompt, **extra[1]).sample
    assert torch.equal(full, plain_first)
    assert torch.equal(cached, forced_second)
    assert not torch.allclose(cached, plain_second, atol=1e-3), "the cached call computed its deep modules"


@torch.no_grad()
def test_another_input_shape_runs_a_full_call(pipes):
    unet = pipes[0].unet
    (pair, prompt), (single, single_prompt) = unet_inputs(unet, 1), unet_inputs(unet, 2, batch=1)
    plain = unet(single, 700, encoder_hidden_states=single_prompt).sample
    with reuse_deep_features(unet, 10, 1):
        unet(pair, 900, encoder_hidden_states=prompt)
        after_pair = unet(single, 700, encoder_hidden_states=single_prompt).sample  # batch changed: full
        again = unet(single, 700, encoder_hidden_states=single_prompt * 0.5).sample  # same shape: cached
    assert torch.equal(after_pair, plain)
    assert not torch.equal(again, unet(single, 700, encoder_hidden_states=single_prompt * 0.5).sample)


@pytest.mark.parametrize("axes", ["x", "xy"])
def test_seamless_with_speed_fast_still_rolls_exactly(tiny_model_dir, monkeypatch, axes):
    pipe = test_seamless.load_pipe(tiny_model_dir)
    plain_generate = test_seamless.generate

    def cached_generate(pipe, latents):  # one recording per pipeline run, as denoise does it
        with deep_cache(pipe.unet, "fast"):
            return plain_generate(pipe, latents)

    latents = torch.randn(
        (1, 4, test_seamless.LATENT_H, test_seamless.LATENT_W), generator=torch.Generator().manual_seed(7)
    )
    monkeypatch.setattr(test_seamless, "generate", cached_generate)
    with seamless([pipe.unet, pipe.vae], axes):
        tiled = test_seamless.roll_error(pipe, latents, test_seamless.DIMS[axes])
        cached_image, off_image = cached_generate(pipe, latents), plain_generate(pipe, latents)
    untiled = test_seamless.roll_error(pipe, latents, test_seamless.DIMS[axes])
    assert tiled < 1e-4, f"seamless {axes} with speed fast: the image does not wrap (error {tiled})"
    assert untiled > 0.05, f"without seamless the image already wraps (error {untiled}): the test proves nothing"
    assert np.abs(cached_image - off_image).max() > 1e-3, "speed fast changed nothing: no call was cached"


def test_cfg_batches_of_two_with_a_lora(tiny_model_dir, tmp_path):
    lora = write_twins(tiny_model_dir, tmp_path, 1)[0]
    manager = ModelManager()
    images = {}
    for speed in ("off", "fast"):
        p = GenerateParams(
            model=str(tiny_model_dir), prompt="woven fabric", steps=4, width=64, height=64, seed=5, batch_size=2,
            guidance_scale=7.5, loras=[{"model": str(lora), "weight": 0.8}], output_dir="/unused", speed=speed,
        )  # fmt: skip
        model, _ = manager.get(p)
        images[speed] = np.stack([np.asarray(i, dtype=float) for i in run_txt2img(model.pipe, p).images])
    assert images["fast"].shape == images["off"].shape == (2, 64, 64, 3)
    difference = np.abs(images["fast"] - images["off"])
    assert np.isfinite(difference).all() and difference.max() > 0


def test_a_controlnet_view_runs_cached(tiny_model_dir, tmp_path):
    controlnet_dir = make_test_controlnet(tmp_path / "controlnet", tiny_model_dir, seed=0)
    store, arrays = InputStore(), scene(cube()) | {"cameras": cameras()}
    views = {}
    for speed in ("off", "fast"):
        params_ = request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path, steps=4, speed=speed)
        model, _ = ModelManager().get(model_params(params_.to_dict()))
        pipe = controlnets.pipeline(model, str(controlnet_dir), "controlnet")
        embeds = project.encode_prompt(pipe, params_, True, model.device, count=1)
        views[speed] = np.asarray(project.generate_view(pipe, params_, depth_of_sphere(), 11, embeds), dtype=float)
    difference = np.abs(views["fast"] - views["off"])
    assert np.isfinite(difference).all() and difference.max() > 0


def test_a_bad_speed_is_refused_by_name(tiny_model_dir):
    valid = {"model": str(tiny_model_dir), "prompt": "slate", "output_dir": "/unused"}
    with pytest.raises(ProtocolError) as refused:
        GenerateParams.from_dict({**valid, "speed": "fastest"})
    assert refused.value.code == INVALID_PARAMS and "speed" in str(refused.value)
    with pytest.raises(ValueError, match="speed"), deep_cache(nn.Module(), "fastest"):
        pass
