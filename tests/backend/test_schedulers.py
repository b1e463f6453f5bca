"""Every sampler name runs and samples differently; the metadata names match A1111's."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from backend.schedulers import display_name, make_scheduler
from backend.tasks.txt2img import run_txt2img
from sdtex_contract.protocol import INVALID_PARAMS, SCHEDULERS, GenerateParams, ProtocolError


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_scheduler_makes_a_distinct_image(pipe, tiny_model_dir):
    images = {}
    for name in SCHEDULERS:
        params = GenerateParams(
            model=str(tiny_model_dir),
            prompt="cobblestones",
            steps=3,
            width=64,
            height=64,
            seed=21,
            scheduler=name,
            output_dir="/unused",
        )
        image = np.asarray(run_txt2img(pipe, params).images[0]).astype(np.int16)
        assert image.shape == (64, 64, 3) and image.std() > 0
        images[name] = image
    for a, b in itertools.combinations(SCHEDULERS, 2):
        assert np.abs(images[a] - images[b]).max() > 0, (a, b)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the model's own scheduler is restored


def test_schedulers_come_from_the_model_config(pipe):
    config = pipe.scheduler.config
    karras = make_scheduler("dpmpp_2m_karras", config)
    assert isinstance(karras, DPMSolverMultistepScheduler) and karras.config.use_karras_sigmas
    assert not make_scheduler("dpmpp_2m", config).config.use_karras_sigmas
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, config)
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


def test_display_names_and_unknown_name():
    assert display_name("euler_a") == "Euler a"
    assert display_name("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert len({display_name(name) for name in SCHEDULERS}) == len(SCHEDULERS)
    with pytest.raises(ProtocolError) as info:
        make_scheduler("k_lms", {})
    assert info.value.code == INVALID_PARAMS and info.value.data["param"] == "scheduler"
