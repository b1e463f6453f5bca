"""Step previews decoded by a tiny AutoencoderTiny (TAESD) built offline: equal to diffusers' own decode, in a real
txt2img job; a decoder that is not on disk falls back to the approximation, one for other latents is refused;
decoded previews keep to their share of the job's time (previews.DECODE_BUDGET: unlimited in the other tests, so
that every step's preview comes)."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from test_downloads import hub, hub_files  # noqa: F401  (the fake Hugging Face hub and its files: fixtures)

import backend.jobshell
import backend.previews
from backend import downloads
from backend.families import SD
from backend.previews import decode_to_rgb, latents_to_rgb
from backend.tiny_model import make_test_model, make_test_preview_decoder
from backend.worker import Worker
from sdtex_contract import model_catalog, protocol


@pytest.fixture(autouse=True)
def unlimited_decoding(monkeypatch):
    monkeypatch.setattr(backend.previews, "DECODE_BUDGET", float("inf"))


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("taesd") / "tiny-taesd", seed=3, architecture="tiny-taesd")


class Recorder:
    def __init__(self):
        self.messages: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, message: dict) -> None:
        with self.lock:
            self.messages.append(message)


def run_job(worker: Worker, request_id: str, params: dict) -> tuple[dict, list[protocol.PreviewEvent]]:
    """The job's terminal reply and its preview events."""
    worker.handle(protocol.request(request_id, protocol.RUN, params))
    mine = [m for m in worker.emit.messages if m.get("id") == request_id]
    previews = [protocol.PreviewEvent(**m["data"]) for m in mine if m.get("event") == protocol.EVENT_PREVIEW]
    return next(m for m in mine if protocol.is_terminal(m)), previews


@pytest.fixture
def step_latents(monkeypatch) -> list[torch.Tensor]:
    """The latents every step's on_step gets (JobProgress.step is the job's on_step)."""
    seen = []
    step = backend.jobshell.JobProgress.step

    def recording(self, done: int, total: int, latents: torch.Tensor) -> None:
        seen.append(latents.detach().clone())
        step(self, done, total, latents)

    monkeypatch.setattr(backend.jobshell.JobProgress, "step", recording)
    return seen


def pixels(event: protocol.PreviewEvent) -> np.ndarray:
    return np.frombuffer(base64.b64decode(event.rgb), dtype=np.uint8).reshape(event.height, event.width, 3)


def diffusers_decode(folder: Path, latents: torch.Tensor) -> np.ndarray:
    """diffusers' own: AutoencoderTiny.decode of the first image's latents averaged over 2x2 cells (previews are
    decoded at half the side), VaeImageProcessor's PIL conversion."""
    vae = AutoencoderTiny.from_pretrained(folder)
    channels, height, width = latents.shape[1:]
    half = latents[:1].reshape(1, channels, height // 2, 2, width // 2, 2).mean((3, 5))
    with torch.no_grad():
        image = vae.decode(half / vae.config.scaling_factor).sample
    return np.asarray(VaeImageProcessor(vae_scale_factor=2).postprocess(image, output_type="pil")[0])


def test_decode_equals_a_diffusers_pipeline_with_the_tiny_autoencoder_as_its_vae(tiny_model_dir, taesd_dir):
    decoder = AutoencoderTiny.from_pretrained(taesd_dir)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, vae=decoder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    image = pipe("oak", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(5),
                 callback_on_step_end=keep).images[0]  # fmt: skip
    ours = decode_to_rgb(decoder, final["latents"][0]).numpy()
    assert ours.shape == (64, 64, 3) and np.array_equal(ours, np.asarray(image))
    assert ours.std() > 1  # a picture, not one flat colour: the equality says something


def test_job_previews_are_the_decoders_pictures_of_each_steps_latents(run_params, taesd_dir, step_latents):
    worker = Worker(Recorder())
    params = {**run_params, "steps": 3, "preview_every": 1, "preview_decoder": str(taesd_dir), "batch_size": 2}
    reply, previews = run_job(worker, "a", params)
    assert "result" in reply, reply
    assert [p.step for p in previews] == [1, 2, 3] and len(step_latents) == 3
    for event, latents in zip(previews, step_latents, strict=True):
        assert (event.decoder, event.note, event.width, event.height) == (str(taesd_dir), "", 32, 32)  # 64 px / 2
        assert np.array_equal(pixels(event), diffusers_decode(taesd_dir, latents))
        approximation = latents_to_rgb(latents[0], SD.preview_factors).numpy()
        assert approximation.shape != pixels(event).shape or not np.array_equal(approximation, pixels(event))
    # Warm: a second job loads nothing; memory pressure releases it.
    assert "result" in run_job(worker, "b", params)[0] and worker.preview_decoders.loads == 1
    worker.free_memory()
    assert worker.preview_decoders.loaded is None


@pytest.mark.parametrize(("budget", "decoded"), [(0.0, [1]), (float("inf"), [1, 2, 3, 4])])
def test_decoded_previews_past_their_budget_are_skipped(run_params, taesd_dir, monkeypatch, budget, decoded):
    """Budget 0: only the first preview (nothing spent yet) is decoded, the others would exceed it and are not sent;
    unlimited: every step's."""
    monkeypatch.setattr(backend.previews, "DECODE_BUDGET", budget)
    params = {**run_params, "steps": 4, "preview_every": 1, "preview_decoder": str(taesd_dir)}
    reply, previews = run_job(Worker(Recorder()), "budget", params)
    assert "result" in reply, reply
    assert [p.step for p in previews] == decoded and all(p.decoder == str(taesd_dir) for p in previews)


def broken_decoder(folder: Path) -> str:
    """An AutoencoderTiny folder whose weights file is not safetensors."""
    make_test_preview_decoder(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    return str(folder)


@pytest.mark.parametrize(
    "decoder, words",
    [
        (lambda tmp: "test-org/taesd-never-downloaded", "is not downloaded"),
        (lambda tmp: str(tmp / "no-such-folder"), "no folder"),
        (broken_decoder, "could not load it"),
    ],
    ids=["hub-id-not-cached", "missing-folder", "broken-weights"],
)
def test_a_decoder_that_is_not_usable_falls_back_to_the_approximation_and_says_so_once(
    run_params, tmp_path, monkeypatch, step_latents, decoder, words
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    setting = decoder(tmp_path / "decoder")
    reply, previews = run_job(Worker(Recorder()), "c", {**run_params, "preview_every": 1, "preview_decoder": setting})
    assert "result" in reply, reply
    assert [p.step for p in previews] == [1, 2]
    for event, latents in zip(previews, step_latents, strict=True):
        assert event.decoder == "" and np.array_equal(pixels(event), latents_to_rgb(latents[0], SD.preview_factors))
    first, second = previews
    assert words in first.note and "preview_decoder" in first.note and "approximate" in first.note
    assert second.note == ""


def test_a_decoder_for_other_latents_is_refused_by_name_before_it_loads(run_params, tmp_path):
    folder = make_test_preview_decoder(tmp_path / "taesd16", latent_channels=16)
    worker = Worker(Recorder())
    reply, previews = run_job(worker, "d", {**run_params, "preview_every": 1, "preview_decoder": str(folder)})
    error = reply["error"]
    assert error["code"] == protocol.INVALID_PARAMS and error["data"]["param"] == "preview_decoder"
    assert error["message"].startswith("preview_decoder:") and "16-channel" in error["message"]
    assert previews == [] and worker.preview_decoders.loads == 0


def test_no_decoder_is_looked_for_when_the_job_sends_no_previews(run_params, tmp_path):
    folder = make_test_preview_decoder(tmp_path / "taesd16", latent_channels=16)  # would be refused if looked at
    worker = Worker(Recorder())
    reply, _ = run_job(worker, "e", {**run_params, "preview_every": 0, "preview_decoder": str(folder)})
    assert "result" in reply and worker.preview_decoders.loads == 0


def test_a_preview_decoder_downloads_like_a_model_is_listed_as_one_and_decodes_by_hub_id(
    hub,  # noqa: F811  (the fixture)
    taesd_dir,
    run_params,
    monkeypatch,
):
    import huggingface_hub.constants

    files = {p.name: p.read_bytes() for p in taesd_dir.iterdir()}
    hub.repos["test-org/taesd"] = {**files, "diffusion_pytorch_model.bin": b"pickle", "taesd_decoder.pth": b"pickle"}
    worker = Worker(Recorder())
    worker.handle(protocol.request("dl", protocol.RUN, {"task": "download_model", "model": "test-org/taesd"}))
    result = protocol.DownloadResult.from_dict(next(m for m in worker.emit.messages if "result" in m)["result"])
    assert sorted(result.files) == ["config.json", "diffusion_pytorch_model.safetensors"] and result.family == ""
    assert sorted(hub.gets) == ["config.json", "diffusion_pytorch_model.safetensors"]  # never the pickles
    assert model_catalog.local_status("test-org/taesd", hub.cache) == "cached"
    (entry,) = [e for e in downloads.cached_models(hub.cache) if e.model == "test-org/taesd"]
    assert not entry.usable and "preview decoder" in entry.problem  # not offered as a generator
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reply, previews = run_job(worker, "p", {**run_params, "preview_every": 1, "preview_decoder": "test-org/taesd"})
    assert "result" in reply and [p.decoder for p in previews] == ["test-org/taesd"] * 2


def test_travel_frames_previews_are_decoded_too(tiny_model_dir, taesd_dir, tmp_path, monkeypatch):
    import backend.tasks.travel

    seen = []
    step = backend.tasks.travel.FrameProgress.step
    monkeypatch.setattr(
        backend.tasks.travel.FrameProgress, "step", lambda self, *a: (seen.append(a[2].clone()), step(self, *a))
    )
    keyframes = [{"prompt": "bricks", "seed": 1}, {"prompt": "moss", "seed": 2}]
    params = {"task": "travel", "model": str(tiny_model_dir), "output_dir": str(tmp_path), "keyframes": keyframes,
              "frames": 2, "steps": 1, "width": 64, "height": 64}  # fmt: skip
    params |= {"preview_every": 1, "preview_decoder": str(taesd_dir)}
    reply, previews = run_job(Worker(Recorder()), "t", params)
    assert "result" in reply, reply
    assert len(previews) == len(seen) >= 2 and {p.decoder for p in previews} == {str(taesd_dir)}
    for event, latents in zip(previews, seen, strict=True):
        assert np.array_equal(pixels(event), diffusers_decode(taesd_dir, latents))
