"""Finding, refusing and caching models."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend.families import SD, SDXL
from backend.models import (
    PIPELINE_CLASSES,
    ModelManager,
    locate,
    pick_device,
    pick_dtype,
    single_file_family,
)
from sdtex_contract import protocol
from sdtex_contract.protocol import MODEL_LOAD_FAILED, MODEL_NOT_FOUND, GenerateParams, ProtocolError


def code_of(call) -> str:
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.data.get("param") in ("model", "device", "cpu_offload")
    return info.value.code


def test_locate_sources(tiny_model_dir, tmp_path):
    folder = locate(str(tiny_model_dir))
    assert (folder.kind, folder.location, folder.use_safetensors) == ("folder", str(tiny_model_dir), True)
    single = tmp_path / "brick.safetensors"
    save_file({"x": torch.zeros(1)}, str(single))
    assert locate(str(single)).kind == "single_file"
    assert locate("stabilityai/sd-turbo").kind == "hub"
    assert code_of(lambda: locate(str(tmp_path / "missing"))) == protocol.MODEL_NOT_FOUND
    assert code_of(lambda: locate("not a hub id")) == protocol.MODEL_NOT_FOUND
    assert code_of(lambda: locate(str(tmp_path))) == protocol.MODEL_LOAD_FAILED  # no model_index.json
    notes = tmp_path / "model.txt"
    notes.write_text("hello")
    assert code_of(lambda: locate(str(notes))) == protocol.MODEL_LOAD_FAILED


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_need_allow_pickle(tmp_path, suffix):
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(b"not loaded")
    assert code_of(lambda: locate(str(checkpoint))) == protocol.UNSAFE_CHECKPOINT
    allowed = locate(str(checkpoint), allow_pickle=True)
    assert allowed.kind == "single_file" and not allowed.use_safetensors


def test_folder_with_pickle_weights_needs_allow_pickle(tiny_model_dir, tmp_path):
    folder = tmp_path / "bin-weights"
    shutil.copytree(tiny_model_dir, folder)
    text_encoder = folder / "text_encoder" / "model.safetensors"
    text_encoder.rename(text_encoder.with_suffix(".bin"))  # one component in pickle format is enough
    with pytest.raises(ProtocolError) as info:
        locate(str(folder))
    assert info.value.code == protocol.UNSAFE_CHECKPOINT and "text_encoder" in info.value.message
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    assert code_of(lambda: locate(str(folder))) == protocol.UNSAFE_CHECKPOINT
    assert not locate(str(folder), allow_pickle=True).use_safetensors


def test_single_file_family_from_header_only(tmp_path):
    """diffusers' checkpoint inference on the header's names and shapes (tests/backend/test_single_file.py loads)."""
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}
    sdxl, sd15 = tmp_path / "xl.safetensors", tmp_path / "v15.safetensors"
    xl_key = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"  # SDXL's second encoder
    save_file({**unet, xl_key: torch.zeros(2)}, str(sdxl))
    save_file(unet, str(sd15))
    assert single_file_family(locate(str(sdxl))) is SDXL and single_file_family(locate(str(sd15))) is SD
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2)}, str(lora))
    assert code_of(lambda: single_file_family(locate(str(lora)))) == MODEL_LOAD_FAILED
    pickled = tmp_path / "v15.ckpt"
    pickled.write_bytes(b"not loaded")  # allowed pickles are loaded to look: this one cannot be
    assert code_of(lambda: single_file_family(locate(str(pickled), allow_pickle=True))) == MODEL_LOAD_FAILED


def test_devices_and_dtypes():
    assert pick_dtype("auto", "cpu") == "fp32" and pick_dtype("auto", "cuda") == "fp16"
    assert pick_dtype("bf16", "cpu") == "bf16"
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert code_of(lambda: pick_device("cuda")) == protocol.INVALID_PARAMS


def params_for(model, **changes) -> GenerateParams:
    return GenerateParams(model=str(model), prompt="x", output_dir="/unused", **changes)


def test_manager_keeps_one_model_warm(tiny_model_dir, tmp_path):
    manager = ModelManager()
    first, seconds = manager.get(params_for(tiny_model_dir))
    assert seconds > 0 and first.key.device == "cpu" and first.key.dtype == "fp32"
    again, seconds = manager.get(params_for(tiny_model_dir, attention_slicing=True))
    assert again is first and seconds == 0.0  # per-request options do not reload
    old_pipe = weakref.ref(first.pipe)
    del first, again

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    other, seconds = manager.get(params_for(copy))
    gc.collect()
    assert seconds > 0 and other.key.source.location == str(copy)
    assert old_pipe() is None  # the previous pipeline was released
    assert manager.loaded_name == str(copy)


def test_per_request_options(tiny_model_dir):
    manager = ModelManager()
    model, _ = manager.get(params_for(tiny_model_dir, vae_tiling=True))
    assert model.pipe.vae.use_tiling and model.pipe.vae.sdtex_tiled_decode
    manager.get(params_for(tiny_model_dir, vae_tiling=True, seamless="xy"))
    # The exact tiled decode stays on; diffusers' encoder tiles would wrap one by one
    assert not model.pipe.vae.use_tiling and model.pipe.vae.sdtex_tiled_decode

    def sliced() -> bool:
        return any("Sliced" in type(p).__name__ for p in model.pipe.unet.attn_processors.values())

    assert not sliced()
    manager.get(params_for(tiny_model_dir, attention_slicing=True))
    assert sliced() and model.attention_slicing
    manager.get(params_for(tiny_model_dir, attention_slicing=True))
    assert sliced()
    manager.get(params_for(tiny_model_dir))
    assert not sliced() and not model.attention_slicing
    assert not model.pipe.vae.sdtex_tiled_decode
    if not torch.cuda.is_available():
        assert code_of(lambda: manager.get(params_for(tiny_model_dir, cpu_offload=True))) == protocol.INVALID_PARAMS


def test_sdxl_folder_loads_through_the_manager(tiny_sdxl_model_dir):
    assert set(PIPELINE_CLASSES) == {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}
    model, seconds = ModelManager().get(params_for(tiny_sdxl_model_dir))
    assert seconds > 0 and model.family is SDXL and type(model.pipe) is SDXL.txt2img
    assert model.pipe.watermark is None  # it would alter pixels and break seamless tiling
    assert model.dtype_name == "fp32"


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_task_variants_share_the_warm_weights(request, fixture):
    # bf16 on the CPU: from_pipe casts shared modules to fp32 unless told otherwise
    model, _ = ModelManager().get(params_for(request.getfixturevalue(fixture), dtype="bf16"))
    assert model.key.dtype == model.dtype_name == "bf16"
    family = model.family
    assert model.pipeline("txt2img") is model.pipe
    for task in ("img2img", "inpaint"):
        variant = model.pipeline(task)
        assert type(variant) is family.pipelines[task]
        assert model.pipeline(task) is variant  # built once
        for name, component in model.pipe.components.items():
            assert variant.components[name] is component, name
        assert model.dtype_name == "bf16" and variant.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no 'upscale' pipeline"):
        model.pipeline("upscale")


def test_unsupported_pipeline_class(tiny_model_dir, tmp_path):
    folder = tmp_path / "flux"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ProtocolError) as info:
        ModelManager().get(params_for(folder))
    assert info.value.code == protocol.MODEL_LOAD_FAILED
    assert "FluxPipeline" in info.value.message and "StableDiffusionXLPipeline" in info.value.message


def test_pickle_folder_loads_only_when_allowed(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(tiny_model_dir).save_pretrained(folder, safe_serialization=False)
    assert list((folder / "unet").glob("*.bin")) and not list((folder / "unet").glob("*.safetensors"))
    assert code_of(lambda: ModelManager().get(params_for(folder))) == protocol.UNSAFE_CHECKPOINT
    model, _ = ModelManager().get(params_for(folder, allow_pickle=True))
    assert tuple(model.pipe.unet.config.block_out_channels) == (32, 64)


@pytest.mark.parametrize("decoy", ["decoy.safetensors", "notes.safetensors.txt.safetensors"])
def test_pickle_folder_with_a_decoy_safetensors_is_refused_as_unsafe(tiny_model_dir, tmp_path, decoy):
    """A .safetensors file that is not a component's weights makes no pickle safe: refused before loading."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(tiny_model_dir).save_pretrained(folder, safe_serialization=False)
    for component in (p for p in folder.iterdir() if p.is_dir()):
        (component / decoy).write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")
    (folder / decoy).write_bytes(b"{}")
    with pytest.raises(ProtocolError) as info:
        ModelManager().get(params_for(folder))
    assert info.value.code == protocol.UNSAFE_CHECKPOINT and "unet" in info.value.message
    assert not locate(str(folder), allow_pickle=True).use_safetensors  # allowed: loads its .bin weights


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("/tmp/" + "a" * 300 + "/model", MODEL_NOT_FOUND),  # a name longer than the file system allows
        ("/tmp/" + "b" * 300 + ".safetensors", MODEL_NOT_FOUND),
        ("renamed", MODEL_LOAD_FAILED),  # a pickle checkpoint renamed to .safetensors
    ],
)
def test_unusable_model_paths_are_named_errors_not_crashes(tmp_path, model, code):
    if model == "renamed":
        model = str(tmp_path / "model.safetensors")
        Path(model).write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # pickle protocol 4 header, not safetensors
    params = GenerateParams.from_dict({"model": model, "prompt": "x", "output_dir": str(tmp_path)})
    with pytest.raises(ProtocolError) as info:
        ModelManager().get(params)
    assert info.value.code == code and info.value.data["param"] == "model"
