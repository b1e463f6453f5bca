"""Drafts: a draft request is the final request with only its preset's fields changed (against the presets as
written here); on one warm worker, Draft then Final gives the final image bit for bit as Final alone on a fresh
worker, for every preset (LoRAs switched back, the sampler restored, nothing left behind); the samplers the
presets add match diffusers' own schedulers run through diffusers' own pipeline, as their model cards call them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, TCDScheduler
from PIL import Image
from test_loras import write_twins
from test_parity import load_twice
from worker_process import WorkerProcess

from backend.families import SD
from backend.tasks.txt2img import run_txt2img
from sdtex_contract import protocol
from sdtex_contract.drafts import draft_params

LORA = "/loras/draft.safetensors"
# The presets as their model cards give them: (steps, guidance, sampler, takes a LoRA). None: the final's own.
PRESETS = {
    "steps": (8, None, None, False),
    "lcm": (4, 1.0, "lcm", True),
    "tcd": (4, 0.0, "tcd", True),
    "hyper": (8, 0.0, "ddim_trailing", True),
    "turbo": (1, 0.0, "euler_a_trailing", False),
}


def final_request(model: str, output_dir: str, loras: list[dict] = ()) -> dict:
    """A checked txt2img request as the add-on sends it: every field present, the seed set."""
    values = dict(
        model=model, prompt="cracked clay tiles", negative_prompt="text", seed=11, steps=25, guidance_scale=6.5,
        width=64, height=64, scheduler="euler_a", seamless="x", output_dir=output_dir, loras=list(loras), pbr=True,
    )  # fmt: skip
    return protocol.GenerateParams.from_dict(values).to_dict()


def expected_changes(preset: str, final: dict) -> dict:
    steps, guidance, scheduler, lora = PRESETS[preset]
    changes = {"steps": steps, "pbr": False}  # a draft is never applied: no maps
    if guidance is not None:
        changes["guidance_scale"] = guidance
    if scheduler is not None:
        changes["scheduler"] = scheduler
    if lora:
        changes["loras"] = [*final["loras"], {"model": LORA, "weight": 1.0}]
    return changes


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_draft_differs_from_its_final_only_in_the_presets_fields(preset):
    final = final_request("/m", "/out", [{"model": "/loras/own.safetensors", "weight": 0.7}])
    draft = draft_params(final, preset, LORA if PRESETS[preset][3] else None)
    changed = {name: draft[name] for name in final if draft[name] != final[name]}
    assert changed == expected_changes(preset, final)
    assert set(draft) == set(final) and protocol.GenerateParams.from_dict(draft).to_dict() == draft


def test_a_draft_never_takes_more_steps_than_its_final():
    final = final_request("/m", "/out") | {"steps": 5}
    assert draft_params(final, "steps")["steps"] == 5 and draft_params(final, "lcm", LORA)["steps"] == 4


@pytest.mark.parametrize(
    ("preset", "lora", "changes", "param", "says"),
    [
        ("fast", None, {}, "draft", "one of steps, lcm, tcd, hyper, turbo"),
        ("lcm", None, {}, "draft_lora", "latent-consistency/lcm-lora-sdv1-5"),
        ("tcd", "  ", {}, "draft_lora", "h1t/TCD-SD15-LoRA"),
        ("hyper", "", {}, "draft_lora", "Hyper-SD15-8steps-lora.safetensors"),
        ("steps", LORA, {}, "draft_lora", "takes no LoRA"),
        ("steps", None, {"seed": None}, "seed", "pick it before"),
        ("lcm", LORA, {"loras": [{"model": f"/{i}.safetensors"} for i in range(8)]}, "loras", "at most 7"),
    ],
)  # fmt: skip
def test_bad_drafts_are_named(preset, lora, changes, param, says):
    with pytest.raises(protocol.ProtocolError) as info:
        draft_params(final_request("/m", "/out") | changes, preset, lora)
    assert info.value.code == protocol.INVALID_PARAMS and info.value.data["param"] == param
    assert says in info.value.message


# --- the warm worker: nothing of a draft leaks into the final -------------------------------------------------


def pixels(reply: dict) -> np.ndarray:
    assert "result" in reply, reply
    with Image.open(reply["result"]["images"][0]["path"]) as image:
        return np.asarray(image.convert("RGB"))


def test_draft_then_final_on_a_warm_worker_is_final_alone_on_a_fresh_one(tiny_model_dir, tmp_path):
    own = write_twins(tiny_model_dir, tmp_path / "loras", seed=3)[0]  # the artist's own LoRA, in both
    draft_lora = write_twins(tiny_model_dir, tmp_path / "loras", seed=4)[0]  # stands in for LCM / TCD / Hyper-SD's
    final = final_request(str(tiny_model_dir), str(tmp_path / "out"), [{"model": str(own), "weight": 0.7}])
    final["steps"] = 10  # the steps preset's 8 are fewer
    fresh = WorkerProcess()
    try:
        alone = pixels(fresh.call(protocol.RUN, final)[0])
    finally:
        fresh.close()

    warm = WorkerProcess()
    try:
        for preset, (_, _, _, lora) in PRESETS.items():
            draft = pixels(warm.call(protocol.RUN, draft_params(final, preset, str(draft_lora) if lora else None))[0])
            after = pixels(warm.call(protocol.RUN, final)[0])
            assert np.array_equal(after, alone), preset
            assert not np.array_equal(draft, alone), preset  # the draft did run with other settings
    finally:
        warm.close()


# --- the presets' samplers: diffusers' own, through diffusers' own pipeline ----------------------------------


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    return load_twice(tiny_model_dir, SD)


@pytest.mark.parametrize(
    ("name", "scheduler", "extra", "call"),
    [
        ("tcd", TCDScheduler, {}, {"eta": 0.3}),  # TCD's model cards: eta (gamma) 0.3
        ("ddim_trailing", DDIMScheduler, {"timestep_spacing": "trailing"}, {}),  # Hyper-SD's
        ("euler_a_trailing", EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, {}),
    ],
)
@pytest.mark.parametrize("guidance", [0.0, 7.5])
def test_the_presets_samplers_match_diffusers(pipes, tiny_model_dir, name, scheduler, extra, call, guidance):
    ours, reference = pipes
    p = protocol.GenerateParams(
        model=str(tiny_model_dir), prompt="cracked clay tiles", steps=4, guidance_scale=guidance, width=64,
        height=64, seed=21, scheduler=name, output_dir="/unused",
    )  # fmt: skip
    original = reference.scheduler
    reference.scheduler = scheduler.from_config(original.config, **extra)

    def reference_image(**arguments) -> np.ndarray:
        image = reference(
            p.prompt, num_inference_steps=p.steps, guidance_scale=p.guidance_scale, height=p.height, width=p.width,
            generator=torch.Generator("cpu").manual_seed(p.seed), **arguments,
        ).images[0]  # fmt: skip
        return np.asarray(image)

    try:
        expected = reference_image(**call)
        plain = reference_image()  # the pipeline's defaults (eta 0)
    finally:
        reference.scheduler = original
    image = np.asarray(run_txt2img(ours, p).images[0])
    assert np.array_equal(image, expected)
    assert np.array_equal(plain, expected) != bool(call)  # TCD's eta changes the picture: it is passed
    assert type(ours.scheduler) is type(original)  # the warm pipeline keeps its own
