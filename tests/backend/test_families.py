"""The model-family table: lookups by pipeline, class and model_index name, and rows that fit diffusers."""

from __future__ import annotations

import inspect

import pytest
from diffusers import FluxPipeline, StableDiffusionXLImg2ImgPipeline

from backend.families import (
    FAMILIES,
    SD,
    SDXL,
    family_of,
    family_of_class_name,
    family_of_pipeline_class,
    size_multiple,
)
from backend.worker import size_multiple as worker_size_multiple

ROWS = [(family, task, cls) for family in FAMILIES.values() for task, cls in family.pipelines.items()]


@pytest.mark.parametrize(("family", "task", "cls"), ROWS, ids=lambda v: getattr(v, "name", None) or str(v))
def test_every_task_class_maps_back_to_its_family_and_takes_its_kwargs(family, task, cls):
    assert family_of_pipeline_class(cls) is family
    accepted = inspect.signature(cls.__init__).parameters
    assert set(family.pipeline_kwargs) <= set(accepted), f"{cls.__name__} would ignore a load option"
    if task == "txt2img":
        assert set(family.prompt_embeds) <= set(inspect.signature(cls.__call__).parameters)


def test_lookups_by_name_take_only_loadable_txt2img_classes():
    assert family_of_class_name("StableDiffusionPipeline") is SD
    assert family_of_class_name("StableDiffusionXLPipeline") is SDXL
    # A saved refiner (one text encoder) or an unknown class is not loadable as a txt2img model.
    for name in (StableDiffusionXLImg2ImgPipeline.__name__, "FluxPipeline", None):
        assert family_of_class_name(name) is None
    with pytest.raises(ValueError, match="FluxPipeline belongs to no supported model family"):
        family_of_pipeline_class(FluxPipeline)


def test_rows_describe_each_family():
    assert (SD.default_size, SDXL.default_size) == (512, 1024)
    for family in FAMILIES.values():
        assert len(family.preview_factors) == 4 and all(len(row) == 3 for row in family.preview_factors)
        call = inspect.signature(family.txt2img.__call__)
        assert family.default_guidance == call.parameters["guidance_scale"].default


@pytest.mark.parametrize(("fixture", "family"), [("tiny_model_dir", SD), ("tiny_sdxl_model_dir", SDXL)])
def test_loaded_pipelines_and_their_size_multiple(request, fixture, family):
    pipe = family.txt2img.from_pretrained(request.getfixturevalue(fixture), **family.pipeline_kwargs)
    assert family_of(pipe) is family
    assert size_multiple(pipe) == 4  # the tiny models: VAE factor 2 times one U-Net downsampling
    assert worker_size_multiple is size_multiple  # worker.py imports it from there
