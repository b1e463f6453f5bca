"""PNG files: safe unique names inside output_dir, metadata that round-trips, PBR maps beside the albedo."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.outputs import TEMP_PREFIX, sanitise_prefix, save_images
from sdtex_contract.protocol import OUTPUT_FAILED, PROTOCOL_VERSION, GenerateParams, ProtocolError


def make_params(tmp_path, **changes) -> GenerateParams:
    values = dict(
        model="/models/brick-v2.safetensors",
        prompt="red brick wall, moss",
        negative_prompt="people",
        steps=20,
        guidance_scale=6.5,
        width=64,
        height=64,
        scheduler="euler_a",
        seed=42,
        output_dir=str(tmp_path / "textures"),
    )
    return GenerateParams(**{**values, **changes})


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_metadata_round_trips(tmp_path):
    params = make_params(tmp_path, seamless="xy")
    (record,) = save_images([noise_image(0)], [42], params)
    with Image.open(record.path) as image:
        text = image.text
        assert np.array_equal(np.asarray(image), np.asarray(noise_image(0)))  # lossless
    assert text["parameters"] == (
        "red brick wall, moss\n"
        "Negative prompt: people\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 64x64, Model: brick-v2, Seamless: xy"
    )
    settings = json.loads(text["sdtex"])
    assert settings["params"] == params.to_dict()
    assert settings["seed"] == 42 and settings["protocol_version"] == PROTOCOL_VERSION


def test_names_are_unique_and_never_overwrite(tmp_path):
    params = make_params(tmp_path, filename_prefix="wall")
    first = save_images([noise_image(1), noise_image(2)], [7, 8], params)
    second = save_images([noise_image(3)], [7], params)  # same second, same seed
    paths = [r.path for r in first + second]
    assert len(set(paths)) == 3
    assert all(p.startswith(str((tmp_path / "textures").resolve()) + "/wall_") for p in paths)
    with Image.open(first[0].path) as image:
        assert np.array_equal(np.asarray(image), np.asarray(noise_image(1)))


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("../../etc/x", "etc_x"), ("/abs/path", "abs_path"), ("..", "sdtex"), ("a b\\c", "a_b_c"), ("ok-1.v2", "ok-1.v2")],
)
def test_prefix_is_sanitised(prefix, expected):
    assert sanitise_prefix(prefix) == expected


def test_prefix_cannot_escape_output_dir(tmp_path):
    out = tmp_path / "deep" / "out"
    for prefix in ("../../../escape", "/tmp/escape", "..\\..\\escape"):
        (record,) = save_images(
            [noise_image(4)], [1], make_params(tmp_path, output_dir=str(out), filename_prefix=prefix)
        )
        assert (tmp_path / "deep" / "out").resolve() == type(out)(record.path).parent
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(p.name for p in out.glob("*.png"))


def test_output_dir_must_be_absolute(tmp_path):
    with pytest.raises(ProtocolError) as info:
        save_images([noise_image(5)], [1], make_params(tmp_path, output_dir="relative/out"))
    assert info.value.data["param"] == "output_dir"


def test_pbr_maps_are_written_beside_the_albedo(tmp_path):
    (record,) = save_images([noise_image(6)], [3], make_params(tmp_path, pbr=True, seamless="x"))
    assert set(record.maps) == {"height", "normal", "roughness", "ao"}
    albedo_stem = type(tmp_path)(record.path).stem
    for name, path in record.maps.items():
        assert path.endswith(f"{albedo_stem}_{name}.png")
        with Image.open(path) as image:
            assert image.size == (64, 64)
            # Maps carry our settings but not the A1111 chunk: other tools must not list them as generations.
            assert "parameters" not in image.text
            assert json.loads(image.text["sdtex"])["role"] == name


def test_artifacts_are_announced_complete_in_order(tmp_path):
    announced = []

    def announce(artifact):
        assert os.path.isfile(artifact.path)  # complete under its final name when announced
        with open(artifact.path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == artifact.sha256 and f.tell() == artifact.size
        announced.append(artifact)

    records = save_images([noise_image(1), noise_image(2)], [5, 6], make_params(tmp_path, pbr=True), announce)
    assert [(a.index, a.role) for a in announced] == [
        (i, role) for i in (0, 1) for role in ("albedo", "height", "normal", "roughness", "ao")
    ]
    assert [a.path for a in announced if a.kind == "image"] == [r.path for r in records]
    assert not list((tmp_path / "textures").glob(TEMP_PREFIX + "*"))  # no temporary file left behind


def test_a_planted_symlink_is_skipped_not_followed(tmp_path):
    params = make_params(tmp_path, filename_prefix="wall")
    (first,) = save_images([noise_image(1)], [7], params)
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    # The next name the writer would pick: a symlink to a file outside the folder.
    planted = Path(first.path).with_name(Path(first.path).stem + "_1.png")
    planted.symlink_to(target)
    (second,) = save_images([noise_image(2)], [7], params)
    assert second.path not in (first.path, str(planted)) and target.read_text() == "keep me"


def test_unwritable_output_dir_is_named_before_anything_is_written(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root ignores permissions: use a path under a file instead
            folder = tmp_path / "a-file" / "sub"
            (tmp_path / "a-file").write_text("")
        with pytest.raises(ProtocolError) as info:
            save_images([noise_image(1)], [1], make_params(tmp_path, output_dir=str(folder)))
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert info.value.code == OUTPUT_FAILED and str(folder) in info.value.message
    assert info.value.data["param"] == "output_dir"
