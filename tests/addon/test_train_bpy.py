"""Training in real Blender (bpy 5.0 as a module) with the real worker and the tiny model: the Train operator runs
the job (blocking in background mode), keeps every step's loss for the sparkline, loads the samples as images
and puts the LoRA in the LoRA list; generating with that list changes the texture; the headless API trains and
lists LoRAs too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon import api  # noqa: E402
from blender_sd_addon.blender import session, train  # noqa: E402


def write_photos(folder: Path, count: int = 4) -> Path:
    """Small coloured squares with a disc, each its own colours and size."""
    import PIL.Image
    import PIL.ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = PIL.Image.new("RGB", (40 + 8 * i, 48), (40 * i, 200 - 30 * i, 90))
        PIL.ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill=(250, 250 - 50 * i, 10 * i))
        image.save(folder / f"photo{i}.png")
    return folder


def test_sparkline_spans_the_blocks_low_to_high():
    assert train.sparkline([]) == ""
    assert train.sparkline([3.0, 2.0, 1.0]) == "█▅▁"  # highest, middle, lowest block
    line = train.sparkline([float(v) for v in range(100, 0, -1)], width=8)
    assert len(line) == 8 and line[0] == "█" and line[-1] == "▁" and list(line) == sorted(line, reverse=True)
    assert train.sparkline([0.5] * 5) == "▁" * 5  # flat: no division by zero


def test_presets_and_prompts(scene):
    settings = scene.sdtex_train
    settings.preset = "STYLE"
    assert (settings.steps, settings.rank, settings.prior) == (1000, 16, False)
    settings.preset = "SUBJECT"
    assert (settings.steps, settings.rank, settings.prior) == (500, 4, True)
    assert train.prompts("SUBJECT", "sks", "oak") == ("a photo of sks oak", "a photo of oak")
    assert train.prompts("STYLE", "zwx", "tiles") == ("tiles in zwx style", "")


def test_train_operator_adds_the_lora_and_generation_uses_it(scene, tmp_path):
    session.preferences().output_folder = str(tmp_path / "out")
    settings = scene.sdtex_train
    settings.photos_dir = str(write_photos(tmp_path / "photos"))
    settings.token, settings.subject, settings.prior = "sks", "tiles", False
    settings.steps, settings.resolution, settings.learning_rate, settings.sample_every = 3, 32, 5e-3, 3

    assert bpy.ops.sdtex.train() == {"FINISHED"}

    job = train.STATE.job
    assert job.state == "done" and len(job.losses) == 3 and len(train.sparkline(job.losses)) == 3
    assert train.STATE.samples and train.STATE.samples[0] in bpy.data.images
    (entry,) = settings.loras
    assert entry.enabled and entry.weight == 1.0 and Path(entry.filepath).suffix == ".safetensors"
    assert train.generation_loras(scene) == [{"model": entry.filepath, "weight": 1.0}]

    def texture(loras) -> np.ndarray:
        result = api.generate_texture(
            [], "sks tiles", seed=4, steps=2, width=64, height=64, apply=False, loras=loras
        )  # fmt: skip
        return np.asarray(PIL_open(result.files[0]))

    base, with_lora = texture([]), texture(train.generation_loras(scene))
    assert np.abs(with_lora.astype(int) - base).max() > 0
    entry.enabled = False
    assert train.generation_loras(scene) == []


def PIL_open(path: str):
    import PIL.Image

    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def test_api_trains_and_lists_loras(scene, tmp_path):
    photos = write_photos(tmp_path / "photos")
    result = api.train_lora(
        sorted(str(p) for p in photos.iterdir()), "a photo of zwx tiles", token="zwx", steps=2, resolution=32,
        output_dir=str(tmp_path / "loras"),
    )  # fmt: skip
    assert result.steps == 2 and len(result.photos) == 4 and Path(result.lora).is_file()
    listed = api.list_loras(str(tmp_path / "loras"))
    assert [(entry["model"], entry["base"]) for entry in listed] == [(result.lora, "sd1")]


def test_missing_photos_folder_is_a_clear_report(scene):
    scene.sdtex_train.photos_dir = ""
    with pytest.raises(RuntimeError, match="photos_dir: choose the folder"):
        bpy.ops.sdtex.train()


def test_the_panel_says_when_the_backend_cannot_train(monkeypatch):
    from types import SimpleNamespace

    from blender_sd_addon.contract import protocol

    reason = "PEFT 0.21.2 is older than transformers 5.24.0 needs (0.22.0)"
    shake = protocol.HandshakeResult.from_dict(
        {"protocol_version": 2, "backend_version": "x", "devices": ["cpu"], "schedulers": [], "tasks": {},
         "unavailable": {"train_lora": reason}}
    )  # fmt: skip
    monkeypatch.setattr(train.session, "remote_settings", lambda: None)
    monkeypatch.setattr(train.session, "current_client", lambda: SimpleNamespace(alive=True, handshake=shake))
    line = train.unavailable_line()
    assert line.text == f"Training unavailable: {reason}" and line.fixes[0][1] == "Reinstall Backend"
    shake.unavailable = {}
    assert train.unavailable_line() is None
