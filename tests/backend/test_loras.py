"""LoRAs on the warm model: our worker's path (ModelManager + run_txt2img) gives what diffusers' own
`load_lora_weights` + pipeline call gives; a kohya-layout file has the same effect as its diffusers-layout twin;
two LoRAs with weights combine as diffusers' `set_adapters` combines them; switching between requests never
reloads the base model and leaves nothing behind (not even in from_pipe variants, which share the U-Net)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from safetensors.torch import save_file

from backend import loras
from backend.families import SD, SDXL, Family
from backend.models import ModelManager
from backend.tasks.txt2img import run_txt2img
from sdtex_contract.protocol import (
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    UNSAFE_CHECKPOINT,
    GenerateParams,
    ProtocolError,
)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def load(model_dir: Path, family: Family = SD) -> DiffusionPipeline:
    pipe = family.txt2img.from_pretrained(model_dir, **family.pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_twins(
    model_dir: Path, folder: Path, seed: int, rank: int = 4, alpha: float = 2.0, family: Family = SD
) -> tuple[Path, Path]:
    """The same LoRA (seeded random A/B matrices for every U-Net attention projection and text-encoder
    projection, alpha/rank = 0.5) in the diffusers/PEFT layout and in the kohya / A1111 layout."""
    pipe = load(model_dir, family)
    generator = torch.Generator().manual_seed(seed)
    diffusers_layout, kohya_layout = {}, {}
    components = [
        (pipe.unet, "unet", "lora_unet", UNET_TARGETS),
        (pipe.text_encoder, "text_encoder", "lora_te", TEXT_TARGETS),
    ]
    if family is SDXL:
        components.append((pipe.text_encoder_2, "text_encoder_2", "lora_te2", TEXT_TARGETS))
    for component, prefix, kohya_prefix, targets in components:
        for name, module in component.named_modules():
            if not name.endswith(targets):
                continue
            down = torch.randn(rank, module.in_features, generator=generator) * 0.3
            up = torch.randn(module.out_features, rank, generator=generator) * 0.3
            # diffusers' layout has no alpha: its scale alpha/rank is folded into B (what converting does too).
            diffusers_layout[f"{prefix}.{name}.lora_A.weight"] = down
            diffusers_layout[f"{prefix}.{name}.lora_B.weight"] = up * (alpha / rank)
            key = f"{kohya_prefix}_{name.replace('.', '_')}"
            kohya_layout |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
            kohya_layout[f"{key}.alpha"] = torch.tensor(alpha)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"diffusers_{family.name}_{seed}.safetensors", folder / f"kohya_{family.name}_{seed}.safetensors"
    save_file(diffusers_layout, paths[0])
    save_file(kohya_layout, paths[1])
    return paths


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {"a": write_twins(tiny_model_dir, folder, 1), "b": write_twins(tiny_model_dir, folder, 2)}


def params(model_dir: Path, lora_list=(), **changes) -> GenerateParams:
    values = dict(
        model=str(model_dir), prompt="woven fabric", steps=2, width=64, height=64, seed=5, scheduler="ddim",
        output_dir="/unused", loras=[{"model": str(m), "weight": w} for m, w in lora_list],
    )  # fmt: skip
    return GenerateParams(**{**values, **changes})


def ours(manager: ModelManager, p: GenerateParams) -> np.ndarray:
    model, _ = manager.get(p)
    return np.asarray(run_txt2img(model.pipe, p, device=model.device).images[0])


def reference(model_dir: Path, lora_list, p: GenerateParams, family: Family = SD) -> np.ndarray:
    """A fresh diffusers pipeline, LoRAs loaded with its own load_lora_weights and set_adapters."""
    pipe = load(model_dir, family)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    names = []
    for i, (path, _) in enumerate(lora_list):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[w for _, w in lora_list])
    image = pipe(
        p.prompt, num_inference_steps=p.steps, guidance_scale=p.guidance_scale, height=p.height, width=p.width,
        generator=torch.Generator("cpu").manual_seed(p.seed),
    ).images[0]  # fmt: skip
    return np.asarray(image)


@pytest.fixture(scope="module")
def manager():
    return ModelManager()


def test_lora_changes_the_image_and_matches_diffusers_own_loading(manager, tiny_model_dir, lora_files):
    chosen = [(lora_files["a"][0], 0.8)]
    base = ours(manager, params(tiny_model_dir))
    with_lora = ours(manager, params(tiny_model_dir, chosen))
    assert np.abs(with_lora.astype(int) - base).max() > 10
    assert np.array_equal(with_lora, reference(tiny_model_dir, chosen, params(tiny_model_dir)))


def test_kohya_layout_has_the_same_effect_as_its_diffusers_twin(manager, tiny_model_dir, lora_files):
    diffusers_file, kohya_file = lora_files["a"]
    from_diffusers = ours(manager, params(tiny_model_dir, [(diffusers_file, 1.0)]))
    from_kohya = ours(manager, params(tiny_model_dir, [(kohya_file, 1.0)]))
    assert np.abs(from_diffusers.astype(int) - ours(manager, params(tiny_model_dir))).max() > 10
    assert np.abs(from_kohya.astype(int) - from_diffusers).max() <= 1  # float rounding of alpha/rank only


def test_sdxl_loras_on_both_text_encoders_match_diffusers(tiny_sdxl_model_dir, tmp_path):
    diffusers_file, kohya_file = write_twins(tiny_sdxl_model_dir, tmp_path, 3, family=SDXL)
    manager = ModelManager()
    p = params(tiny_sdxl_model_dir, guidance_scale=5.0)
    base = ours(manager, p)
    chosen = [(diffusers_file, 0.6)]
    with_lora = ours(manager, params(tiny_sdxl_model_dir, chosen, guidance_scale=5.0))
    assert np.abs(with_lora.astype(int) - base).max() > 10
    assert np.array_equal(with_lora, reference(tiny_sdxl_model_dir, chosen, p, SDXL))
    from_kohya = ours(manager, params(tiny_sdxl_model_dir, [(kohya_file, 0.6)], guidance_scale=5.0))
    assert np.abs(from_kohya.astype(int) - with_lora).max() <= 1
    assert loras.lora_base(diffusers_file) == loras.lora_base(kohya_file) == "sdxl"


def test_two_loras_combine_as_diffusers_set_adapters(manager, tiny_model_dir, lora_files):
    chosen = [(lora_files["a"][0], 0.7), (lora_files["b"][1], -0.4)]  # one diffusers-, one kohya-layout file
    combined = ours(manager, params(tiny_model_dir, chosen))
    assert np.array_equal(combined, reference(tiny_model_dir, chosen, params(tiny_model_dir)))
    only_a = ours(manager, params(tiny_model_dir, chosen[:1]))
    assert np.abs(combined.astype(int) - only_a).max() > 10


def test_switching_keeps_the_base_model_and_leaves_nothing_behind(manager, tiny_model_dir, lora_files):
    base_params = params(tiny_model_dir)
    base = ours(manager, base_params)
    model, _ = manager.get(base_params)
    pipe = model.pipe
    img2img = model.pipeline("img2img")  # a from_pipe variant: shares the U-Net the adapters live in
    image = torch.zeros(1, 3, 64, 64) + 0.2
    call = dict(prompt="woven fabric", image=image, strength=0.8, num_inference_steps=2, output_type="np")
    base_img2img = img2img(**call, generator=torch.Generator().manual_seed(3)).images

    lora_a = ours(manager, params(tiny_model_dir, [(lora_files["a"][0], 1.0)]))
    model, seconds = manager.get(params(tiny_model_dir, [(lora_files["b"][0], 1.0)]))
    assert model.pipe is pipe and seconds == 0.0  # switched, not reloaded
    both = {
        loras.locate([{"model": str(p), "weight": 1.0}])[0].adapter for p in (lora_files["a"][0], lora_files["b"][0])
    }
    assert both <= set(loras.active(pipe))  # both stay loaded, only b is active
    assert not np.array_equal(ours(manager, params(tiny_model_dir, [(lora_files["a"][0], 1.0)])), base)

    # A request naming none: exactly the base model again, in txt2img and in the img2img variant.
    assert np.array_equal(ours(manager, base_params), base)
    assert np.array_equal(img2img(**call, generator=torch.Generator().manual_seed(3)).images, base_img2img)
    assert np.array_equal(ours(manager, params(tiny_model_dir, [(lora_files["a"][0], 1.0)])), lora_a)


def test_old_adapters_are_deleted_beyond_the_kept_number(tiny_model_dir, tmp_path, lora_files, monkeypatch):
    monkeypatch.setattr(loras, "KEEP_LOADED", 1)
    manager = ModelManager()
    files = [lora_files["a"][0], lora_files["b"][0], lora_files["a"][1]]
    for path in files:
        manager.get(params(tiny_model_dir, [(path, 1.0)]))
    pipe = manager.loaded.pipe
    names = [loras.locate([{"model": str(p), "weight": 1.0}])[0].adapter for p in files]
    assert list(loras.active(pipe)) == names[1:]
    assert set(pipe.get_list_adapters()["unet"]) == set(names[1:])


def test_bad_loras_are_named(manager, tiny_model_dir, tmp_path):
    def refused(lora_list, **changes) -> ProtocolError:
        with pytest.raises(ProtocolError) as info:
            manager.get(params(tiny_model_dir, lora_list, **changes))
        return info.value

    missing = refused([(tmp_path / "x.safetensors", 1.0)])
    assert (missing.code, missing.data["param"]) == (MODEL_NOT_FOUND, "loras[0].model")
    pickled = tmp_path / "style.bin"
    pickled.write_bytes(b"\x80\x04not really")
    unsafe = refused([(pickled, 1.0)])
    assert unsafe.code == UNSAFE_CHECKPOINT and "pickle" in unsafe.message
    not_lora = tmp_path / "weights.safetensors"
    save_file({"some.layer.weight": torch.zeros(2, 2)}, not_lora)
    wrong = refused([(not_lora, 1.0)])
    assert (wrong.code, wrong.data["param"]) == (MODEL_LOAD_FAILED, "loras[0].model")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a", "b"):
        save_file({"x": torch.zeros(1)}, two / f"{name}.safetensors")
    ambiguous = refused([(two, 1.0)])
    assert ambiguous.data["param"] == "loras[0].model" and "a.safetensors, b.safetensors" in ambiguous.message


def test_list_loras_finds_lora_files_only(tiny_model_dir, lora_files, tmp_path):
    folder = tmp_path / "models"
    (folder / "styles").mkdir(parents=True)
    (folder / "styles" / "wood.safetensors").write_bytes(Path(lora_files["a"][1]).read_bytes())
    save_file({"model.diffusion_model.x": torch.zeros(1)}, folder / "checkpoint.safetensors")
    found = loras.list_loras(folder)
    assert [(entry["name"], entry["base"]) for entry in found] == [("wood", "sd1")]
