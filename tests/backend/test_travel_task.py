"""Latent travel: keyframes are plain txt2img generations bit for bit, the frames between them are smooth,
a loop is a cycle, seamless frames tile exactly, and frames survive cancel and are not made twice.

The proofs need no trained weights: equality with txt2img, equality between two travels that must agree,
roll-equivariance per frame, and a smoothness measure checked against a jump (which must fail it).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from backend.__main__ import main as cli_main
from backend.context import Cancelled, JobContext
from backend.models import ModelManager
from backend.seamless import seamless
from backend.steps import decode_latents
from backend.tasks import travel as travel_task
from backend.tasks import txt2img
from backend.travel import frame_plan, lerp, slerp
from sdtex_contract import protocol
from sdtex_contract.protocol import GenerateParams, ProtocolError, TravelParams

KEYS = [
    {"prompt": "red clay bricks", "seed": 11},
    {"prompt": "blue ocean waves", "negative_prompt": "blurry", "seed": 22},
    {"prompt": "green moss", "seed": 33},
]
SETTINGS = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def models() -> ModelManager:
    return ModelManager()


def context(models: ModelManager, events: list | None = None, cancel_after_frames: int | None = None) -> JobContext:
    def emit(kind: str, data: dict) -> None:
        if events is not None:
            events.append((kind, data))

    def cancelled() -> bool:
        frames = sum(1 for kind, data in events or () if kind == "artifact" and data["kind"] == "frame")
        return cancel_after_frames is not None and frames >= cancel_after_frames

    return JobContext("job", models, None, emit=emit, is_cancelled=cancelled)


def travel_params(model: Path, out: Path, keyframes=KEYS[:2], **settings) -> TravelParams:
    return TravelParams.from_dict(
        {"model": str(model), "output_dir": str(out), "keyframes": keyframes, "frames": 3} | SETTINGS | settings
    )


def pixels(path: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB")).astype(np.float64)


def frames_of(result) -> list[np.ndarray]:
    return [pixels(image.path) for image in result.images]


def txt2img_of(models, model: Path, out: Path, key: dict, **settings) -> np.ndarray:
    params = GenerateParams.from_dict({"model": str(model), "output_dir": str(out), **key} | SETTINGS | settings)
    return pixels(txt2img.run(context(models), params).images[0].path)


# --- the math, alone ---------------------------------------------------------------------------------------


def test_frame_plan_counts_and_cycles():
    open_plan = frame_plan(3, 4, loop=False)
    assert len(open_plan) == 2 * 4 + 1
    assert [(f.start, f.end, f.t) for f in open_plan[:5]] == [(0, 1, 0.0), (0, 1, 0.25), (0, 1, 0.5), (0, 1, 0.75),
                                                               (1, 2, 0.0)]  # fmt: skip
    assert (open_plan[-1].start, open_plan[-1].t) == (2, 0.0)
    loop = frame_plan(3, 4, loop=True)
    assert len(loop) == 3 * 4 and (loop[-1].start, loop[-1].end) == (2, 0)  # the last transition leads to key 0
    for keys, frames, looped in ((2, 1, False), (2, 5, True), (4, 3, False)):
        assert len(frame_plan(keys, frames, looped)) == protocol.travel_length(keys, frames, looped)
    eased = [f.t for f in frame_plan(2, 4, loop=False, easing="ease_in_out")]
    assert eased[0] == 0 and eased[2] == pytest.approx(0.5) and eased[1] < 0.25 and eased[3] > 0.75


def test_slerp_returns_the_key_itself_and_keeps_the_norm_that_lerp_loses():
    a, b = (torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert slerp(a, b, 0.0, dims=(1, 2, 3)) is a
    assert torch.allclose(slerp(a, b, 1.0, dims=(1, 2, 3)), b, atol=1e-5)
    norm = float(a.norm() + b.norm()) / 2
    assert float(slerp(a, b, 0.5, dims=(1, 2, 3)).norm()) == pytest.approx(norm, rel=0.02)
    assert float(lerp(a, b, 0.5).norm()) < 0.8 * norm  # independent noises: a straight line shrinks to ~0.71


# --- keyframes are txt2img, loops are cycles -------------------------------------------------------------------


@pytest.mark.parametrize("scheduler, frames", [("euler_a", 2), ("ddim", 1), ("ddpm", 1)])  # ancestral, ODE, SDE
def test_keyframe_frames_equal_plain_txt2img_bit_for_bit(models, tiny_model_dir, tmp_path, scheduler, frames):
    params = travel_params(tiny_model_dir, tmp_path / "travel", KEYS, frames=frames, scheduler=scheduler)
    made = frames_of(travel_task.run(context(models), params))
    assert len(made) == 2 * frames + 1
    for key, index in zip(KEYS, (0, frames, 2 * frames), strict=True):
        plain = txt2img_of(models, tiny_model_dir, tmp_path / "plain", key, scheduler=scheduler)
        assert np.array_equal(made[index], plain), f"frame {index} differs from txt2img of {key['prompt']!r}"
    if frames > 1:
        assert not np.array_equal(made[1], made[0]) and not np.array_equal(made[1], made[2])


def test_loop_is_a_cycle_the_frame_after_the_last_is_frame_0(models, tiny_model_dir, tmp_path):
    """Looped [k0, k1] with n frames per transition has 2n frames; the open travel [k0, k1, k0] makes the same
    frames and one more, its last keyframe: the frame that would follow the loop's last. It is frame 0."""
    looped = frames_of(travel_task.run(context(models), travel_params(tiny_model_dir, tmp_path, loop=True)))
    opened = frames_of(travel_task.run(context(models), travel_params(tiny_model_dir, tmp_path, [*KEYS[:2], KEYS[0]])))
    assert len(looped) == 6 and len(opened) == 7
    assert all(np.array_equal(a, b) for a, b in zip(looped, opened[:6], strict=True))
    assert np.array_equal(opened[6], looped[0])
    wrap = np.abs(looped[-1] - looped[0]).mean()
    assert wrap < 0.6 * np.abs(looped[3] - looped[0]).mean()  # the last frame is near frame 0, not a key away


# --- smoothness, measured ------------------------------------------------------------------------------------


def largest_step(frames: list[np.ndarray]) -> float:
    """The largest mean pixel difference between neighbouring frames."""
    return max(np.abs(b - a).mean() for a, b in itertools.pairwise(frames))


def test_frames_move_in_small_steps_that_shrink_as_frames_are_added(models, tiny_model_dir, tmp_path, monkeypatch):
    runs = {n: frames_of(travel_task.run(context(models), travel_params(tiny_model_dir, tmp_path, frames=n)))
            for n in (3, 6)}  # fmt: skip
    key_step = np.abs(runs[3][-1] - runs[3][0]).mean()
    assert largest_step(runs[3]) < 0.6 * key_step
    assert largest_step(runs[6]) < 0.8 * largest_step(runs[3])

    # The same measure catches noise that jumps from one seed's to the other's mid-way
    monkeypatch.setattr(travel_task, "blend_noise", lambda a, b, t: a if t < 0.5 else b)
    jumped = frames_of(travel_task.run(context(models), travel_params(tiny_model_dir, tmp_path / "jump", frames=6)))
    assert largest_step(jumped) > 0.6 * key_step


# --- seamless: every frame tiles exactly -----------------------------------------------------------------------


def test_every_seamless_frame_tiles_exactly(models, tiny_model_dir, tmp_path):
    """Rolling both keyframes' noise rolls every frame's image by the same amount (deterministic sampler, all
    convs circular): each frame wraps around exactly. Without seamless the same check fails."""
    params = travel_params(tiny_model_dir, tmp_path, frames=2, seamless="xy", scheduler="ddim", width=64, height=96)
    model, _ = models.get(travel_task.params_of(params, params.keyframes[0]))
    pipe = model.pipe
    keys = travel_task.prepare_keys(pipe, [travel_task.params_of(params, k) for k in params.keyframes], model.device)
    shift = 2  # latent cells: a multiple of the tiny U-Net's downsampling
    rolled = [travel_task.Key(k.params, k.embeds, torch.roll(k.noise, (shift, shift), (2, 3)), k.generator_state)
              for k in keys]  # fmt: skip
    pixels_shift = shift * pipe.vae_scale_factor

    def error(frame, axes: str) -> float:
        with torch.no_grad(), seamless([pipe.unet, pipe.vae], axes):
            image = decode_latents(pipe, travel_task.render_latents(pipe, keys, frame, params), "np")[0]
            of_rolled = decode_latents(pipe, travel_task.render_latents(pipe, rolled, frame, params), "np")[0]
        return float(np.abs(np.roll(image, (pixels_shift, pixels_shift), (0, 1)) - of_rolled).max())

    plan = frame_plan(2, 2, loop=False)  # key 0, half-way, key 1
    errors = [error(frame, "xy") for frame in plan]
    assert max(errors) < 1e-4, errors
    assert error(plan[1], "none") > 0.05  # the check can fail


# --- bad inputs: refused before any work -----------------------------------------------------------------------


def test_one_keyframe_is_refused_naming_keyframes(models, tmp_path):
    params = travel_params(tmp_path / "no-model", tmp_path / "out", KEYS[:1])
    with pytest.raises(ProtocolError) as err:
        travel_task.run(context(models), params)
    assert err.value.data["param"] == "keyframes" and "at least 2" in err.value.message


def test_zero_frames_is_refused_naming_frames():
    with pytest.raises(ProtocolError) as err:
        protocol.task_params({"task": "travel", "model": "m", "output_dir": "/o", "keyframes": KEYS, "frames": 0})
    assert err.value.data["param"] == "frames"


def test_too_many_frames_for_the_disk_is_refused_before_the_model_loads(models, tmp_path):
    keyframes = [{"prompt": f"key {i}", "seed": i} for i in range(protocol.KEYFRAMES_MAX)]
    params = travel_params(tmp_path / "no-model", tmp_path / "out", keyframes, frames=protocol.TRAVEL_FRAMES_MAX,
                           width=2048, height=2048, pbr=True)  # fmt: skip  # ~2.6 TB
    with pytest.raises(ProtocolError) as err:
        travel_task.run(context(models), params)  # the model does not exist: loading it would fail otherwise
    assert err.value.code == protocol.NOT_ENOUGH_SPACE and err.value.data["param"] == "frames"
    assert err.value.data["needed"] > err.value.data["free"]
    assert list((tmp_path / "out").iterdir()) == []  # nothing written


# --- files: announced as they come, kept on cancel, not made twice --------------------------------------------


def test_cancel_keeps_finished_frames_and_a_rerun_skips_them(models, tiny_model_dir, tmp_path):
    params = travel_params(tiny_model_dir, tmp_path / "out", frames=3, pbr=True)
    events: list = []
    with pytest.raises(Cancelled):
        travel_task.run(context(models, events, cancel_after_frames=2), params)
    finished = [data for kind, data in events if kind == "artifact"]
    assert [a["index"] for a in finished if a["kind"] == "frame"] == [0, 1]
    assert {a["role"] for a in finished if a["index"] == 0} == {"albedo", "height", "normal", "roughness", "ao"}
    kept = {a["path"]: Path(a["path"]).stat().st_ino for a in finished}
    assert all(Path(path).is_file() for path in kept)
    assert [Path(a["path"]).name for a in finished if a["kind"] == "frame"] == ["sdtex_0001.png", "sdtex_0002.png"]

    events = []
    result = travel_task.run(context(models, events), params)
    made = sorted({data["image_index"] for kind, data in events if kind == "progress"})
    assert made == [2, 3]  # only the frames not on disk were denoised
    assert {path: Path(path).stat().st_ino for path in kept} == kept  # the finished files were left alone
    announced = [data["index"] for kind, data in events if kind == "artifact" and data["kind"] == "frame"]
    assert announced == [0, 1, 2, 3]
    assert [Path(i.path).parent for i in result.images] == [Path(next(iter(kept))).parent] * 4

    fresh = travel_task.run(context(models), travel_params(tiny_model_dir, tmp_path / "fresh", frames=3, pbr=True))
    for resumed, whole in zip(result.images, fresh.images, strict=True):
        assert np.array_equal(pixels(resumed.path), pixels(whole.path))
        assert np.array_equal(pixels(resumed.maps["normal"]), pixels(whole.maps["normal"]))


def test_progress_names_the_frame(models, tiny_model_dir, tmp_path):
    events: list = []
    travel_task.run(context(models, events), travel_params(tiny_model_dir, tmp_path, frames=2))
    progress = [data for kind, data in events if kind == "progress"]
    assert [(p["image_index"], p["frames"], p["step"], p["total"]) for p in progress] == [
        (frame, 3, step, 2) for frame in range(3) for step in (1, 2)
    ]


# --- export -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """One folder for every export: the export is not part of the frames' digest, so the frames are made once."""
    return tmp_path_factory.mktemp("export")


@pytest.mark.parametrize("export", ["gif", "webp", "mp4"])
def test_export_holds_every_frame(models, tiny_model_dir, export_dir, export):
    events: list = []
    result = travel_task.run(
        context(models, events), travel_params(tiny_model_dir, export_dir, export=export, frames=2, fps=12)
    )
    animation = [data for kind, data in events if kind == "artifact" and data["kind"] == "animation"]
    assert len(animation) == 1 and animation[0]["path"].endswith("." + export)
    if export == "mp4":
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(animation[0]["path"])
        meta = next(reader)
        decoded = [np.frombuffer(f, np.uint8).reshape(64, 64, 3) for f in reader]
        assert meta["fps"] == 12 and len(decoded) == len(result.images)
        first = decoded[0].astype(np.float64)
    else:
        with PIL.Image.open(animation[0]["path"]) as image:
            assert image.n_frames == len(result.images)
            first = np.asarray(image.convert("RGB")).astype(np.float64)
    if export == "webp":  # lossless
        assert np.array_equal(first, pixels(result.images[0].path))
    # GIF (palette) and MP4 are lossy, but recognisably frame 0 rather than another frame
    error = np.abs(first - pixels(result.images[0].path)).mean()
    assert error < 0.5 * np.abs(first - pixels(result.images[-1].path)).mean()


def test_cli_runs_a_travel_and_prints_its_frames(tiny_model_dir, tmp_path, capsys):
    argv = ["travel", "--model", str(tiny_model_dir), "--keyframes", json.dumps(KEYS[:2]), "--frames", "1",
            "--steps", "1", "--width", "64", "--height", "64", "--out", str(tmp_path)]  # fmt: skip
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out.split()
    assert [Path(p).name for p in printed] == ["sdtex_0001.png", "sdtex_0002.png"]
    assert "frame 2/2, step 1/1" in captured.err
