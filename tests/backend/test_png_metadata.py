"""Every generated PNG carries both chunks: A1111's `parameters` (parsed here the way A1111 parses it) describing
what its task ran, and our `sdtex` JSON. First per task kind on the writer, then through each task's real job."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import PIL.Image
import pytest

from backend.context import JobContext
from backend.inputs import InputStore
from backend.models import ModelManager
from backend.outputs import output_folder, png_info, write_png
from backend.tasks import TASKS
from backend.tiny_model import make_test_controlnet
from backend.travel import Frame
from benchmarks.project import cube
from blender_sd_addon.projection import orbit_views
from sdtex_contract.protocol import EVENT_ARTIFACT, task_params

# A1111's own parser (modules/infotext_utils.py): a "Key: value" pair, the value JSON-quoted when it holds a comma.
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) as A1111 reads them: the last line is the settings when it holds at
    least 3 pairs, the lines from "Negative prompt:" on are the negative prompt."""
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    settings = {k: json.loads(v) if v.startswith('"') else v for k, v in PAIR.findall(last)}
    return "\n".join(prompt), "\n".join(negative), settings


def chunks(info) -> dict[str, str]:
    """The text chunks as a reader finds them in a PNG written with `info`."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (1, 1)).save(buffer, format="PNG", pnginfo=info)
    with PIL.Image.open(buffer) as image:
        return dict(image.text)


BASE = {"model": "/models/oak-v1.safetensors", "prompt": "oak planks", "negative_prompt": "blur", "steps": 12}
BASE |= {"guidance_scale": 6.5, "scheduler": "ddim", "seed": 5, "output_dir": "/tmp/out"}
COMMON = {"Steps": "12", "Sampler": "DDIM", "CFG scale": "6.5", "Seed": "5", "Model": "oak-v1"}
IMAGE = {"image": {"path": "/tmp/in.png"}}
ARRAY = {"path": "/tmp/array.bin", "dtype": "float32", "shape": [1]}
ARRAYS = dict.fromkeys(("triangles", "uvs", "object_index", "cameras"), ARRAY)
CASES = {
    "txt2img": ({"task": "txt2img", "width": 128, "height": 64}, (128, 64), {}, {"Size": "128x64"}),
    "img2img": (
        {"task": "img2img", "strength": 0.45, **IMAGE}, (48, 40), {},
        {"Size": "48x40", "Denoising strength": "0.45"},
    ),
    "inpaint": (
        {"task": "inpaint", "strength": 0.8, "mask_blur": 6, **IMAGE}, (48, 40), {},
        {"Size": "48x40", "Denoising strength": "0.8", "Mask blur": "6"},
    ),
    "make_seamless": (
        {"task": "make_seamless", "mask_blur": 3, **IMAGE}, (64, 64), {},
        {"Size": "64x64", "Denoising strength": "1", "Mask blur": "3", "Seamless": "xy"},
    ),
    "upscale tiled": (
        {"task": "upscale", "scale": 2, "strength": 0.3, **IMAGE}, (128, 96), {},
        {"Size": "64x48", "Hires upscale": "2", "Hires upscaler": "Lanczos", "Denoising strength": "0.3"},
    ),
    "upscale x4": (
        {"task": "upscale", "scale": 4, "upscaler_model": "stabilityai/sd-x4-upscaler", "noise_level": 30, **IMAGE},
        (128, 96), {},
        {"Size": "32x24", "Hires upscale": "4", "Hires upscaler": "stabilityai/sd-x4-upscaler", "Noise level": "30",
         "Model": "stabilityai/sd-x4-upscaler"},
    ),
    "project view 2": (
        {"task": "project", "controlnet": "/cn/depth-v11", "controlnet_scale": 0.8, "mask_blur": 2,
         "width": 64, "height": 64, **ARRAYS},
        (64, 64), {"inpainted": True},
        {"Size": "64x64", "Mask blur": "2",
         "ControlNet 0": "Module: depth, Model: depth-v11, Weight: 0.8, Guidance Start: 0, Guidance End: 1"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_each_task_kind_describes_what_it_ran(case):
    values, size, context, expected = CASES[case]
    params = task_params(BASE | values)
    text = chunks(png_info(params, 5, size, "image" if case.startswith("project") else "albedo", context=context))
    prompt, negative, settings = parse_a1111(text["parameters"])
    assert (prompt, negative) == ("oak planks", "blur")
    assert settings == COMMON | expected
    assert json.loads(text["sdtex"])["params"] == params.to_dict()


def test_a_travel_frame_names_the_keyframes_it_blends():
    keys = [{"prompt": "oak", "negative_prompt": "blur", "seed": 1}, {"prompt": "pine, fresh", "seed": 2}]
    params = task_params(BASE | {"task": "travel", "keyframes": keys, "width": 64, "height": 64})
    key = parse_a1111(chunks(png_info(params, 1, (64, 64), context={"frame": Frame(0, 1, 0.0)}))["parameters"])
    assert key == ("oak", "blur", COMMON | {"Seed": "1", "Size": "64x64"})
    tween = parse_a1111(chunks(png_info(params, None, (64, 64), context={"frame": Frame(0, 1, 0.25)}))["parameters"])
    assert tween[:2] == ("oak", "blur")
    assert tween[2] == COMMON | {
        "Seed": "1", "Size": "64x64", "Variation seed": "2", "Variation seed strength": "0.25",
        "Travel prompt": "pine, fresh", "Travel weight": "0.25",
    }  # fmt: skip


def test_lanczos_alone_says_no_model_ran_and_loras_are_named_in_the_prompt():
    params = task_params(BASE | {"task": "upscale", "strength": 0.0, "scale": 2, **IMAGE})
    settings = parse_a1111(chunks(png_info(params, None, (64, 32)))["parameters"])[2]
    assert settings == {"Size": "32x16", "Postprocess upscale by": "2", "Postprocess upscaler": "Lanczos"}
    loras = [{"model": "/loras/moss.safetensors", "weight": 0.7}]
    params = task_params(BASE | {"task": "txt2img", "model": "/models/a, b:c.safetensors", "loras": loras})
    prompt, _, settings = parse_a1111(chunks(png_info(params, 5, (512, 512)))["parameters"])
    assert prompt == "oak planks <lora:moss:0.7>" and settings["Model"] == "a, b:c"  # quoted, read back whole


def test_maps_masks_and_depth_carry_only_our_chunk(tmp_path):
    params = task_params(BASE | ARRAYS | {"task": "project", "controlnet": "/cn", "output_dir": str(tmp_path)})
    for role in ("mask", "depth", "normal", "height", "roughness", "ao"):
        path = write_png(PIL.Image.new("RGB", (8, 8)), output_folder(params), role, params, 5, role)[0]
        with PIL.Image.open(path) as image:
            assert set(image.text) == {"sdtex"} and json.loads(image.text["sdtex"])["role"] == role


# --- through the real jobs, on the tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager()


def run_job(manager: ModelManager, values: dict, store: InputStore | None = None) -> list[dict]:
    """Run one job; the artifacts it announced."""
    events = []
    ctx = JobContext("job", manager, store or InputStore(), emit=lambda kind, data: events.append((kind, data)))
    TASKS[values["task"]](ctx, task_params(values))
    return [data for kind, data in events if kind == EVENT_ARTIFACT]


def generated(artifacts: list[dict]) -> list[tuple[str, dict[str, str]]]:
    """(role, A1111 settings) of every announced PNG that has a `parameters` chunk; each has an `sdtex` one."""
    found = []
    for artifact in artifacts:
        if artifact["path"].endswith(".png"):
            with PIL.Image.open(artifact["path"]) as image:
                assert "sdtex" in image.text
                if "parameters" in image.text:
                    found.append((artifact["role"], parse_a1111(image.text["parameters"])))
    return found


@pytest.fixture
def job_base(tiny_model_dir, tmp_path) -> dict:
    source = tmp_path / "source.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    base = {"model": str(tiny_model_dir), "prompt": "oak planks", "negative_prompt": "blur", "steps": 2}
    return base | {"seed": 9, "scheduler": "euler", "output_dir": str(tmp_path / "out"), "image": {"path": str(source)}}


TINY = {"Steps": "2", "Sampler": "Euler", "CFG scale": "7.5", "Seed": "9", "Model": "tiny-sd"}
JOBS = {
    "txt2img": ({"width": 64, "height": 64}, {"Size": "64x64"}),
    "img2img": ({"strength": 1.0, "width": 64, "height": 64}, {"Size": "64x64", "Denoising strength": "1"}),
    "inpaint": (
        {"mask_from": "rect", "mask_width": 16, "mask_height": 16, "extend_right": 16},
        {"Size": "80x64", "Denoising strength": "1", "Mask blur": "4"},
    ),
    "make_seamless": (
        {"band_width": 16, "seamless": "x"},
        {"Size": "64x64", "Denoising strength": "1", "Mask blur": "4", "Seamless": "x"},
    ),
    "upscale": (
        {"strength": 1.0, "scale": 2, "tile_size": 64, "tile_overlap": 16},
        {"Size": "64x64", "Hires upscale": "2", "Hires upscaler": "Lanczos", "Denoising strength": "1"},
    ),
}


@pytest.mark.parametrize("task", JOBS)
def test_each_image_job_writes_both_chunks(manager, job_base, task):
    values, expected = JOBS[task]
    found = generated(run_job(manager, job_base | {"task": task, "pbr": True} | values))
    assert found == [("albedo", ("oak planks", "blur", TINY | expected))]  # the maps carry no `parameters`


def test_travel_frames_write_both_chunks(manager, job_base):
    keys = [{"prompt": "oak", "negative_prompt": "", "seed": 3}, {"prompt": "pine", "negative_prompt": "", "seed": 4}]
    values = job_base | {"task": "travel", "keyframes": keys, "frames": 2, "width": 64, "height": 64}
    frames = [settings for _, settings in generated(run_job(manager, values))]
    plain = TINY | {"Size": "64x64"}
    assert frames == [
        ("oak", "", plain | {"Seed": "3"}),
        ("oak", "", plain | {"Seed": "3", "Variation seed": "4", "Variation seed strength": "0.5",
                             "Travel prompt": "pine", "Travel weight": "0.5"}),
        ("pine", "", plain | {"Seed": "4"}),
    ]  # fmt: skip


def test_projection_views_and_bakes_write_both_chunks(manager, job_base, tiny_model_dir, tmp_path):
    store = InputStore()
    box = cube()
    views = np.array(orbit_views((0.0, 0.0, 0.0), 1.8, per_ring=2, elevations=(20.0,)), dtype=np.float32)
    arrays = {"triangles": box.triangles.numpy(), "uvs": box.uvs.numpy(), "cameras": views}
    arrays["object_index"] = np.zeros(len(box.triangles), dtype=np.int32)
    refs = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        refs[name] = {"sha256": store.put(array.tobytes()), "dtype": str(array.dtype), "shape": list(array.shape)}
    controlnet = make_test_controlnet(tmp_path / "depth-cn", tiny_model_dir, seed=0)
    values = job_base | refs | {"task": "project", "controlnet": str(controlnet), "width": 64, "height": 64}
    found = generated(run_job(manager, values | {"texture_size": 64}, store))
    control = "Module: depth, Model: depth-cn, Weight: 1, Guidance Start: 0, Guidance End: 1"
    view = TINY | {"Size": "64x64", "ControlNet 0": control}
    roles = [role for role, _ in found]
    assert roles[-1] == "albedo" and set(roles[:-1]) == {"image"} and len(roles) >= 2  # views, then the bake
    assert found[0][1] == ("oak planks", "blur", view)
    assert found[1][1][2]["Mask blur"] == "4"  # the second view inpainted what the first left


def test_training_samples_write_both_chunks(tiny_model_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        PIL.Image.effect_noise((40, 40), 30 + i).convert("RGB").save(photos / f"photo{i}.png")
    values = {
        "task": "train_lora", "model": str(tiny_model_dir), "photos_dir": str(photos), "instance_prompt": "sks wood",
        "resolution": 32, "steps": 1, "sample_every": 1, "seed": 4, "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    found = generated(run_job(ModelManager(), values))
    assert [role for role, _ in found] == ["sample"]
    prompt, negative, settings = found[0][1]
    assert (prompt, negative) == ("sks wood", "")
    sampler = settings.pop("Sampler")  # the tiny model's own scheduler, by A1111's name when it has one
    assert sampler and settings == {
        "Steps": "25", "CFG scale": "7.5", "Seed": "4", "Size": "32x32", "Model": "tiny-sd", "Training step": "1",
    }  # fmt: skip
