"""The command line: flags from GENERATE_PARAMS, same validation as the worker, paths on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.__main__ import build_parser
from sdtex_contract.protocol import GENERATE_PARAMS

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})},
    )


def example_value(p):
    """A valid non-default value for a parameter, as its flag takes it."""
    if p.choices:
        return p.choices[-1]
    if p.kind is list:  # a JSON list of entries with each item's required fields
        return [{item.name: f"value of {item.name}" for item in p.items if item.required}]
    if p.range:
        return p.kind(p.range.high)
    return f"value of {p.name}"


def test_every_parameter_has_a_flag():
    parser = build_parser()
    for p in GENERATE_PARAMS[1:]:  # the task is the command
        flag = "--" + p.name.replace("_", "-")
        value = example_value(p)
        argv = [flag] if p.kind is bool else [flag, json.dumps(value) if p.kind is list else str(value)]
        args = parser.parse_args(["generate", *argv])
        assert getattr(args, p.name) == (True if p.kind is bool else example_value(p)), p.name
    args = parser.parse_args(["generate", "--no-pbr", "--guidance", "3", "--batch", "2", "--out", "here"])
    assert (args.pbr, args.guidance_scale, args.batch_size, args.output_dir, args.steps) == (False, 3.0, 2, "here", 25)


def test_generate_writes_a_png(tiny_model_dir, tmp_path):
    done = run_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "bark texture",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "4",
        "--batch",
        "2",
        "--seamless",
        "xy",
        "--pbr",
        "--out",
        "textures",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert len(paths) == 2 * 5  # two albedos, four maps each
    assert all(p.parent == tmp_path / "textures" and p.is_file() for p in paths)  # --out resolved against cwd
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64) and "Seed: 4" in image.text["parameters"]
    assert "step 2/2" in done.stderr


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        (["--steps", "0"], "steps"),
        (["--width", "abc"], "width"),
        (["--scheduler", "k_lms"], "scheduler"),
        (["--guidance", "nan"], "guidance_scale"),
    ],
)
def test_bad_flag_value_exits_nonzero_naming_it(flags, name, tmp_path):
    done = run_cli("generate", "--model", "m", "--prompt", "p", "--out", str(tmp_path), *flags)
    assert done.returncode == 2
    assert name.replace("_", "-") in done.stderr or name in done.stderr, done.stderr
    assert done.stdout == ""


def test_without_out_files_go_to_the_users_data_folder_not_the_cwd(tiny_model_dir, tmp_path):
    work, data = tmp_path / "checkout", tmp_path / "data"
    work.mkdir()
    flags = ["--model", str(tiny_model_dir), "--prompt", "bark", "--steps", "1", "--width", "64", "--height", "64"]
    done = run_cli("generate", *flags, cwd=work, env={"XDG_DATA_HOME": str(data)})
    assert done.returncode == 0, done.stderr
    folder = data / "sd-textures" / "outputs"
    (path,) = [Path(line) for line in done.stdout.splitlines()]
    assert path.parent == folder and path.is_file()
    assert list(work.iterdir()) == []  # nothing written where the command ran
    assert f"files written to {folder}" in done.stderr


@pytest.mark.parametrize("command", [["--help"], ["info"]])
def test_commands_print_no_torchvision_notice(command):
    """transformers' "requires torchvision (not installed); falling back to ...Pil" notice, once per import."""
    done = run_cli(*command)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr, done.stderr


def test_info_prints_versions():
    done = run_cli("info")
    assert done.returncode == 0, done.stderr
    import diffusers
    import torch

    assert f"torch {torch.__version__}" in done.stdout
    assert f"diffusers {diffusers.__version__}" in done.stdout
    assert "devices " in done.stdout and "cpu" in done.stdout


def test_pbr_command_derives_maps_of_a_file(tmp_path):
    source = tmp_path / "albedo.png"
    Image.effect_noise((64, 32), 40).convert("RGB").save(source)
    done = run_cli("pbr", "--image", str(source), "--seamless", "x", "--out", "maps", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert [p.name for p in paths] == [f"albedo_{m}.png" for m in ("height", "normal", "roughness", "ao")]
    assert all(p.parent == tmp_path / "maps" and Image.open(p).size == (64, 32) for p in paths)
    missing = run_cli("pbr", "--image", str(tmp_path / "nope.png"), "--out", "maps", cwd=tmp_path)
    assert missing.returncode == 2 and "image: no such file" in missing.stderr


def test_every_image_task_command_has_a_flag_per_parameter():
    from backend.__main__ import COMMANDS
    from sdtex_contract.protocol import TASK_PARAMS, ImageInput

    parser = build_parser()
    for command in ("img2img", "inpaint", "upscale", "make-seamless"):
        table = TASK_PARAMS[COMMANDS[command]]
        images = ["--image", "in.png"]
        for p in table[1:]:
            flag = "--" + p.name.replace("_", "-")
            value = "path.png" if p.kind is ImageInput else example_value(p)
            argv = [flag] if p.kind is bool else [flag, json.dumps(value) if p.kind is list else str(value)]
            args = parser.parse_args([command, *images, *argv])
            assert getattr(args, p.name) == (True if p.kind is bool else value), (command, p.name)


@pytest.mark.parametrize(
    ("command", "flags", "size"),
    [
        ("img2img", ["--strength", "0.5", "--resize", "keep"], (64, 64)),
        ("inpaint", ["--mask", "mask.png", "--mask-blur", "2"], (64, 64)),
        ("upscale", ["--scale", "2", "--strength", "0"], (128, 128)),
        ("make-seamless", ["--seamless", "x", "--band-width", "16"], (64, 64)),
    ],
)
def test_image_task_commands_write_files(tiny_model_dir, tmp_path, command, flags, size):
    y, x = np.mgrid[0:64, 0:64]
    source = np.stack([x * 4, y * 4, np.full_like(x, 90)], -1).astype(np.uint8)
    Image.fromarray(source).save(tmp_path / "wall.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:24, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--model", str(tiny_model_dir), "--prompt", "plaster", "--steps", "2", "--seed", "1", "--out", "out"]

    done = run_cli(command, "--image", "wall.png", *common, *flags, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    (path,) = [Path(line) for line in done.stdout.splitlines()]
    assert path.parent == tmp_path / "out" and path.is_file()
    with Image.open(path) as image:
        assert image.size == size
        if command == "inpaint":  # the source's own pixels, far from what was painted
            np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[:, :8], source[:, :8])
