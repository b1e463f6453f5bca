"""Single-file checkpoints in the original (non-diffusers) layout load with the network blocked.

The checkpoints are written here from random-weight diffusers models by the inverse of diffusers' own
conversion (adapted from diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py, made general over the number of blocks and layers).

- Tiny SD 1.x, 2.x and SDXL checkpoints (fast): their tensor names and the shapes diffusers' inference looks at
  are the real ones (an SD 2.x cross-attention of width 1024, SDXL's 10th OpenCLIP block), so each is told apart by
  `infer_diffusers_model_type`; they load through ModelManager with config folders built like the shipped ones,
  every weight comes back equal, and one denoising step runs.
- The shipped configs (fast, no weights): each builds its real architecture on the meta device; the original-layout
  checkpoint of that architecture is detected as the right family and diffusers converts it back to exactly the
  model's tensor names and shapes.
- The real architectures with random weights, loaded with the shipped configs (opt-in: SDTEX_FULL_SINGLE_FILE=1,
  minutes and ~10 GB of memory per family on a CPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from backend import single_file
from backend.families import SD, SDXL
from backend.models import ModelManager
from sdtex_contract.protocol import MODEL_LOAD_FAILED, GenerateParams, ProtocolError

FULL = os.environ.get("SDTEX_FULL_SINGLE_FILE") == "1"

# --- diffusers -> original layout -------------------------------------------------------------------------

UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL
    "add_embedding.linear_2.": "label_emb.0.2.",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip


def unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers prefix -> original prefix, for any number of levels and layers per block."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    prefixes = dict(UNET_TOP)
    for i in range(levels):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        for j in range(layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (layers + 1) + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (layers + 1) + j}.1."
        if i < levels - 1:
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{slot}."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    prefixes["mid_block.resnets.0."] = "middle_block.0."
    prefixes["mid_block.resnets.1."] = "middle_block.2."
    return prefixes


def _renamed(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if prefix is None:
        return key
    rest = key[len(prefix) :]
    first, _, tail = rest.partition(".")
    if first in inner and ".resnets." in prefix:
        rest = inner[first] + "." + tail
    return prefixes[prefix] + rest


def original_unet(state: dict, config: dict) -> dict:
    prefixes = unet_prefixes(config)
    return {"model.diffusion_model." + _renamed(k, prefixes, UNET_RESNET): v for k, v in state.items()}


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def original_vae(state: dict, config: dict) -> dict:
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        for k in range(2):
            prefixes[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
    for i in range(levels):
        for j in range(layers):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(layers + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        if i < levels - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    out = {}
    for key, value in state.items():
        new = _renamed(key, prefixes, VAE_RESNET)
        if ".mid.attn_1." in new:
            for hf, sd in VAE_ATTENTION.items():
                new = new.replace(".mid.attn_1." + hf, ".mid.attn_1." + sd)
            if value.ndim == 2:  # linear in diffusers, 1x1 conv in the original
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def _with_text_model(state: dict) -> dict:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the original layout has it."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def original_clip(state: dict, prefix: str) -> dict:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): the transformers names under a prefix."""
    return {prefix + k: v for k, v in _with_text_model(state).items()}


OPEN_CLIP = [
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".fc1.", ".c_fc."),
    (".fc2.", ".c_proj."),
    (".self_attn", ".attn"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
]


def original_open_clip(state: dict, prefix: str) -> dict:
    """OpenCLIP (SD 2.x, SDXL's second encoder): q/k/v fused into in_proj, text_projection transposed."""

    def renamed(key: str) -> str:
        for hf, sd in OPEN_CLIP:
            key = key.replace(hf, sd)
        return key

    out, fused = {}, {}
    for key, value in _with_text_model(state).items():
        if match := re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((match[1], match[3]), {})[match[2]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        else:
            out[prefix + renamed(key)] = value
    for (stem, kind), parts in fused.items():
        out[f"{prefix}{renamed(stem)}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def original_checkpoint(components: dict, base: str) -> dict:
    """The whole original-layout state dict of a pipeline's components."""
    unet, vae = components["unet"], components["vae"]
    state = {**original_unet(unet.state_dict(), unet.config), **original_vae(vae.state_dict(), vae.config)}
    text = components["text_encoder"].state_dict()
    if base == "sd1":
        state.update(original_clip(text, "cond_stage_model.transformer."))
    elif base == "sd2":
        state.update(original_open_clip(text, "cond_stage_model.model."))
    else:
        state.update(original_clip(text, "conditioner.embedders.0.transformer."))
        state.update(original_open_clip(components["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    return state


def write_checkpoint(components: dict, base: str, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in original_checkpoint(components, base).items()}, str(path))
    return path


# --- building models from config folders -------------------------------------------------------------------


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def build_components(config_dir: Path, seed: int = 0, device: str = "cpu", dtype=torch.float32) -> dict:
    """Random-weight components for a config folder (shipped or test-made)."""
    components = {}
    with torch.device(device):
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            torch.manual_seed(seed)
            components[name] = cls.from_config(_json(config_dir / name / "config.json")).to(dtype)
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (config_dir / name).is_dir():
                torch.manual_seed(seed)
                config = CLIPTextConfig(**_json(config_dir / name / "config.json"))
                components[name] = cls(config).to(dtype)
    return components


TINY_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=2,  # the original layout's input_blocks.2.1: the 2nd attention of level 0 (SD 2.x's key)
    sample_size=32,
    norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)
TINY_VAE = dict(
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=32,
    layers_per_block=1,
    sample_size=64,
)
TINY_TEXT = dict(intermediate_size=37, num_hidden_layers=2, vocab_size=49408)  # the real tokenizer's ids


def tiny_configs(root: Path) -> Path:
    """Config folders shaped like backend/configs/ (same names, model_index, schedulers, tokenizers) for tiny
    architectures whose original-layout keys carry the marks diffusers' inference reads."""
    for name in ("sd15", "sd21", "sdxl"):
        shutil.copytree(single_file.CONFIG_ROOT / name, root / name)
    shutil.copy(single_file.CONFIG_ROOT / single_file.MERGES_FILE, root / single_file.MERGES_FILE)

    def write(folder: str, component: str, data: dict) -> None:
        path = root / folder / component / "config.json"
        merged = {**_json(path), **data}
        for key in ("transformer_layers_per_block", "attention_head_dim"):
            if key in merged and key not in data and isinstance(merged[key], list):
                del merged[key]  # the real per-level lists do not fit 2 levels
        path.write_text(json.dumps(merged), encoding="utf-8")

    for folder in ("sd15", "sd21", "sdxl"):
        write(folder, "vae", TINY_VAE)
    write("sd15", "unet", {**TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": 8})
    write("sd15", "text_encoder", {**TINY_TEXT, "hidden_size": 32, "num_attention_heads": 4})
    # SD 2.x: diffusers tells it by the width of the first cross-attention's keys, 1024 (OpenCLIP ViT-H).
    write("sd21", "unet", {**TINY_UNET, "cross_attention_dim": 1024, "attention_head_dim": [2, 4]})
    write("sd21", "text_encoder", {**TINY_TEXT, "hidden_size": 1024, "num_attention_heads": 16})
    # SDXL: told by the 10th block of the second (OpenCLIP bigG) encoder.
    write("sdxl", "text_encoder", {**TINY_TEXT, "hidden_size": 32, "num_attention_heads": 4})
    write("sdxl", "text_encoder_2", {**TINY_TEXT, "hidden_size": 48, "num_attention_heads": 4,
                                     "num_hidden_layers": 10, "projection_dim": 16})  # fmt: skip
    sdxl_unet = {**TINY_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
                 "transformer_layers_per_block": [1, 2], "cross_attention_dim": 32 + 48,
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 16}  # fmt: skip
    write("sdxl", "unet", sdxl_unet)
    return root


# --- the network, blocked ---------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE on, and any socket connection other than a local (AF_UNIX) one raises."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network blocked by the test: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: guarded(socket.socket(), address))
    yield attempts
    assert not attempts, f"something tried the network: {attempts}"


def load_through_manager(path: Path):
    params = GenerateParams.from_dict({"model": str(path), "prompt": "x", "output_dir": "/unused", "device": "cpu"})
    model, _ = ModelManager().get(params)
    return model


def assert_same_weights(module, original) -> None:
    loaded, expected = module.state_dict(), original.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key].float(), value.float()), key


# --- tests ------------------------------------------------------------------------------------------------

FAMILY_CASES = [("sd15", "sd1", "v1", SD), ("sd21", "sd2", "v2", SD), ("sdxl", "sdxl", "xl_base", SDXL)]


@pytest.fixture(scope="module")
def tiny_config_root(tmp_path_factory) -> Path:
    return tiny_configs(tmp_path_factory.mktemp("configs"))


@pytest.mark.parametrize(("folder", "base", "model_type", "family"), FAMILY_CASES)
def test_tiny_original_checkpoints_load_offline(
    folder, base, model_type, family, tiny_config_root, tmp_path, monkeypatch, no_network
):
    components = build_components(tiny_config_root / folder, seed=3)
    path = write_checkpoint(components, base, tmp_path / f"{folder}.safetensors")
    monkeypatch.setattr(single_file, "CONFIG_ROOT", tiny_config_root)

    kind = single_file.checkpoint_kind(path)
    assert (kind.model_type, kind.base, kind.family) == (model_type, base, family)

    model = load_through_manager(path)
    pipe = model.pipe
    assert model.family is family and type(pipe) is family.txt2img
    for name, original in components.items():
        assert_same_weights(getattr(pipe, name), original)
    # The scheduler is the shipped one (SD 2.x: v-prediction) and the tokenizers are the real CLIP BPE.
    shipped = _json(tiny_config_root / folder / "scheduler" / "scheduler_config.json")
    assert type(pipe.scheduler).__name__ == shipped["_class_name"]
    assert pipe.scheduler.config.prediction_type == shipped.get("prediction_type", "epsilon")
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    image = pipe("mossy bricks", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_not_a_whole_checkpoint_is_named(tmp_path):
    lora = tmp_path / "detail.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(ProtocolError, match="not a whole checkpoint") as info:
        single_file.checkpoint_kind(lora)
    assert info.value.code == MODEL_LOAD_FAILED and info.value.data["param"] == "model"
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}, str(refiner))
    with pytest.raises(ProtocolError, match="SDXL refiner"):
        single_file.checkpoint_kind(refiner)


@pytest.mark.parametrize(("folder", "base", "model_type", "family"), FAMILY_CASES)
def test_shipped_configs_match_the_original_layout(folder, base, model_type, family):
    """The real architectures, on the meta device (no memory, no weights): detected, and converted back by
    diffusers to exactly the model's tensor names and shapes."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    config_dir = single_file.CONFIG_ROOT / folder
    components = build_components(config_dir, device="meta")
    checkpoint = original_checkpoint(components, base)
    assert single_file.model_type_of(checkpoint) == model_type
    assert single_file.UNET_KEY in checkpoint and single_file.KINDS[model_type].config == folder

    def same(converted: dict, module) -> None:
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k.removeprefix("text_model.") if not hasattr(module, "text_model") else k: tuple(v.shape)
               for k, v in converted.items()}  # fmt: skip
        assert {k: v for k, v in got.items() if k in expected} == expected

    same(convert_ldm_unet_checkpoint(checkpoint, components["unet"].config), components["unet"])
    same(convert_ldm_vae_checkpoint(checkpoint, components["vae"].config), components["vae"])
    encoder = components["text_encoder"]
    if base == "sd2":
        same(convert_open_clip_checkpoint(encoder, checkpoint, prefix="cond_stage_model.model."), encoder)
    else:
        same(convert_ldm_clip_checkpoint(checkpoint), encoder)
    if base == "sdxl":
        encoder_2 = components["text_encoder_2"]
        same(convert_open_clip_checkpoint(encoder_2, checkpoint, prefix="conditioner.embedders.1.model."), encoder_2)
    # The shipped tokenizers: CLIP's real ids, and the pad token each family was trained with.
    pads = {name: t.pad_token for name, t in single_file.tokenizers(config_dir).items()}
    assert pads == {"sd1": {"tokenizer": "<|endoftext|>"}, "sd2": {"tokenizer": "!"},
                    "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}}[base]  # fmt: skip


@pytest.mark.skipif(not FULL, reason="real-size random checkpoints: set SDTEX_FULL_SINGLE_FILE=1 (minutes, ~10 GB)")
@pytest.mark.parametrize(("folder", "base", "model_type", "family"), FAMILY_CASES)
def test_real_size_original_checkpoints_load_offline(folder, base, model_type, family, tmp_path, no_network):
    start = time.perf_counter()
    dtype = torch.float16 if base == "sdxl" else torch.float32  # SDXL in fp32 would need ~28 GB here
    components = build_components(single_file.CONFIG_ROOT / folder, seed=1, dtype=dtype)
    path = write_checkpoint(components, base, tmp_path / f"{folder}.safetensors")
    unet_sample = {k: v.clone() for k, v in list(components["unet"].state_dict().items())[:5]}
    del components
    written = time.perf_counter()

    kind = single_file.checkpoint_kind(path)
    assert (kind.model_type, kind.family) == (model_type, family)
    pipe = single_file.load(path, kind, dtype=dtype, **family.pipeline_kwargs)
    loaded = pipe.unet.state_dict()
    for key, value in unet_sample.items():
        assert torch.equal(loaded[key], value), key
    print(f"{folder}: built+written {written - start:.0f}s, loaded {time.perf_counter() - written:.0f}s")
