"""The preview decoder (TAESD) on the add-on's side: a setup line when it is set and not on disk that offers its
download and never blocks Generate; in Blender, the preference reaches every task that sends previews."""

from __future__ import annotations

import pytest

from blender_sd_addon import readiness
from blender_sd_addon.contract import protocol
from blender_sd_addon.readiness import Facts

READY = dict(running=True, device="cuda", torch_version="2.5.1", model="/models/tiny", model_state="folder")
TAESD = "madebyollin/taesd"


def test_a_preview_decoder_not_on_disk_says_previews_are_approximate_and_never_blocks_generate():
    ready = readiness.check(Facts(**READY, preview_decoder=TAESD, preview_decoder_state="missing"))
    assert ready.blocker == "" and ready.preview in ready.lines
    assert ready.preview.text == f"Previews will be approximate: preview decoder {TAESD} not on disk"
    assert ready.preview.kind == readiness.INFO
    assert ready.preview.fixes == (readiness.DOWNLOAD_PREVIEW_DECODER, readiness.SET_PREVIEW_DECODER)
    folder = readiness.check(Facts(**READY, preview_decoder="/models/taesd", preview_decoder_state="invalid"))
    assert folder.preview.fixes == (readiness.SET_PREVIEW_DECODER,)  # a folder cannot be downloaded


@pytest.mark.parametrize(
    "decoder, state", [("", ""), (TAESD, "cached"), ("/models/taesd", "folder"), (TAESD, "remote")]
)
def test_no_preview_line_without_a_decoder_or_with_one_there(decoder, state):
    assert readiness.check(Facts(**READY, preview_decoder=decoder, preview_decoder_state=state)).preview is None


def test_a_preview_decoders_download_shows_on_its_line():
    downloading = dict(downloading=True, download_progress=0.5, download_text="Downloading 5 MB of 10 MB")
    facts = Facts(**READY, preview_decoder=TAESD, preview_decoder_state="missing", download_model=TAESD, **downloading)
    ready = readiness.check(facts)
    assert ready.preview.progress == 0.5 and ready.preview.text.startswith(f"{TAESD}: Downloading")
    assert ready.blocker == "" and ready.model.progress is None


def test_every_task_that_sends_previews_takes_a_preview_decoder():
    previewing = {task for task, table in protocol.TASK_PARAMS.items() if "preview_every" in {p.name for p in table}}
    decoding = {task for task, table in protocol.TASK_PARAMS.items() if "preview_decoder" in {p.name for p in table}}
    assert previewing and previewing == decoding
