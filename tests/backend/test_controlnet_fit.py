"""A ControlNet that does not fit the model is refused when it is loaded, with a message naming the mismatch,
before any denoising: cross-attention width (another family), latent channels, control image downsampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel

from backend import controlnets
from backend.context import JobContext
from backend.inputs import InputStore
from backend.models import ModelManager
from backend.tasks import project
from backend.tiny_model import make_test_controlnet
from benchmarks.project import cube
from blender_sd_addon.projection import orbit_views
from sdtex_contract.protocol import EVENT_PROGRESS, INVALID_PARAMS, ProjectParams, ProtocolError, model_params


@pytest.fixture(scope="module")
def sdxl_controlnet(tiny_sdxl_model_dir, tmp_path_factory) -> Path:
    """A tiny ControlNet made for the tiny SDXL model (cross-attention width 80, the SD one has 32)."""
    return make_test_controlnet(tmp_path_factory.mktemp("cn-sdxl") / "cn", tiny_sdxl_model_dir)


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager()


def job(store: InputStore, model: Path, controlnet: Path, tmp_path: Path) -> ProjectParams:
    mesh = cube(size=1.0)
    arrays = {
        "triangles": mesh.triangles.numpy(),
        "uvs": mesh.uvs.numpy(),
        "object_index": np.zeros(len(mesh.triangles), dtype=np.int32),
        "cameras": np.array(orbit_views((0, 0, 0), 1.0, per_ring=2, elevations=(20.0,)), dtype=np.float32),
    }
    refs = {
        name: {"sha256": store.put(a.tobytes()), "dtype": str(a.dtype), "shape": list(a.shape)}
        for name, a in arrays.items()
    }
    return ProjectParams.from_dict(dict(
        model=str(model), controlnet=str(controlnet), prompt="bronze", seed=1, steps=2, width=64, height=64,
        texture_size=64, output_dir=str(tmp_path / "out"), **refs,
    ))  # fmt: skip


def test_a_controlnet_of_another_width_fails_the_job_before_any_denoising(
    tiny_model_dir, sdxl_controlnet, manager, tmp_path
):
    store = InputStore()
    events: list = []
    params = job(store, tiny_model_dir, sdxl_controlnet, tmp_path)

    with pytest.raises(ProtocolError) as caught:
        project.run(JobContext("fit1", manager, store, emit=lambda kind, data: events.append(kind)), params)

    error = caught.value
    assert error.code == INVALID_PARAMS and error.data["param"] == "controlnet"
    assert error.message == (
        f"controlnet: ControlNet {sdxl_controlnet} has cross-attention width 80 (SDXL) but the model {tiny_model_dir} "
        "has 32: pick a ControlNet made for this model"
    )
    assert EVENT_PROGRESS not in events  # refused at load, not by a shape error in the first step


def test_the_mismatch_names_the_families_the_widths_belong_to(tiny_model_dir, manager):
    model, _ = manager.get(model_params({"model": str(tiny_model_dir)}))
    config = model.pipe.unet.config
    wide = UNet2DConditionModel.from_config(config, cross_attention_dim=1024)
    sd21 = StableDiffusionPipeline.from_pipe(model.pipe, unet=wide)
    sd15 = ControlNetModel.from_unet(UNet2DConditionModel.from_config(config, cross_attention_dim=768),
                                     conditioning_embedding_out_channels=(16, 32))  # fmt: skip
    with pytest.raises(ProtocolError) as caught:
        controlnets.check_fits(sd15, sd21, "depth-sd15", "sd21")
    assert caught.value.message == (
        "controlnet: ControlNet depth-sd15 has cross-attention width 768 (SD 1.x) but the model sd21 has 1024 "
        "(SD 2.x): pick a ControlNet made for SD 2.x"
    )


def test_block_layout_latent_channels_and_control_downsampling_must_match(tiny_model_dir, manager):
    model, _ = manager.get(model_params({"model": str(tiny_model_dir)}))
    fitting = ControlNetModel.from_unet(model.pipe.unet, conditioning_embedding_out_channels=(16, 32))
    controlnets.check_fits(fitting, model.pipe, "fits", "tiny")  # one stride-2 level: 2x, as the tiny VAE

    eight_times = ControlNetModel.from_unet(model.pipe.unet)  # diffusers' default: 8x, as SD's VAE
    with pytest.raises(ProtocolError, match=r"ControlNet big shrinks its control image 8x but the model tiny's "
                                            r"latents are 1/2 of the image"):  # fmt: skip
        controlnets.check_fits(eight_times, model.pipe, "big", "tiny")

    narrow = UNet2DConditionModel.from_config(model.pipe.unet.config, block_out_channels=(32, 32))
    other_blocks = ControlNetModel.from_unet(narrow, conditioning_embedding_out_channels=(16, 32))
    layout = r"ControlNet narrow's U-Net layout, blocks \[32, 32\], differs from the model tiny's, \[32, 64\]: pick"
    with pytest.raises(ProtocolError, match=layout):
        controlnets.check_fits(other_blocks, model.pipe, "narrow", "tiny")

    nine = ControlNetModel.from_config(fitting.config, in_channels=9)
    with pytest.raises(ProtocolError, match="ControlNet inpainting takes 9-channel latents but the model tiny's "
                                            "VAE makes 4"):  # fmt: skip
        controlnets.check_fits(nine, model.pipe, "inpainting", "tiny")


def test_a_fitting_controlnet_still_runs(tiny_model_dir, manager, tmp_path):
    fitting = make_test_controlnet(tmp_path / "cn", tiny_model_dir)
    model, _ = manager.get(model_params({"model": str(tiny_model_dir)}))
    assert controlnets.pipeline(model, str(fitting), "controlnet").controlnet.config.cross_attention_dim == 32
