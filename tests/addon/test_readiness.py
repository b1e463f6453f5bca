"""The panel's setup lines and readable errors (Blender-free)."""

from __future__ import annotations

import pytest

from blender_sd_addon import messages, readiness
from blender_sd_addon.jobs import Job
from blender_sd_addon.readiness import Facts

CHOOSE, ON_DISK = "sdtex.browse_model", "sdtex.pick_model"
READY = dict(running=True, device="cuda", torch_version="2.5.1", model="/models/tiny", model_state="folder")


def fixes(line: readiness.Line) -> list[str]:
    return [operator for operator, _ in line.fixes]


def test_everything_there_lets_generate_run_and_says_where_it_runs():
    ready = readiness.check(Facts(**READY))
    assert ready.blocker == ""
    assert "cuda" in ready.backend.text and "2.5.1" in ready.backend.text
    assert ready.model.text == "Model ready: tiny"


def test_no_interpreter_blocks_generate_and_offers_install():
    ready = readiness.check(Facts(**{**READY, "running": False}, interpreter_error="No Python with the backend"))
    assert ready.blocker == "Backend not installed"
    assert fixes(ready.backend) == ["sdtex.install_backend", "sdtex.open_preferences"]


def test_installing_shows_progress_blocks_and_offers_cancel():
    facts = Facts(interpreter_error="none yet", installing=True, install_progress=0.4, install_message="torch")
    line = readiness.check(facts).backend
    assert (line.ready, line.progress) == (False, 0.4) and "torch" in line.text
    assert fixes(line) == ["sdtex.install_backend_cancel"]  # Cancel in the sidebar, not only in Preferences


def test_a_failed_install_says_why_and_offers_the_log():
    facts = Facts(interpreter_error="none", install_failed=True, install_message="the disk is full: free some space")
    line = readiness.check(facts).backend
    assert line.text == "Install failed: the disk is full: free some space" and line.icon == "ERROR"
    assert fixes(line) == ["sdtex.open_install_log", "sdtex.install_backend", "sdtex.open_preferences"]


def test_a_stopped_worker_does_not_block_generate_which_restarts_it():
    ready = readiness.check(Facts(**{**READY, "running": False}, worker_error="error: killed by SIGKILL"))
    assert ready.backend.ready and "SIGKILL" in ready.backend.text
    assert fixes(ready.backend) == ["sdtex.start_backend"]
    assert ready.backend.icon == "ERROR"  # not a blocker, but no check mark either


ERROR_FACTS = {  # each fact that reports something wrong, with the facts it shows under
    "worker_error": dict(model="/m", model_state="folder", worker_error="error: No Python with the backend found"),
    "install_failed": dict(interpreter_error="none", install_failed=True, install_message="the disk is full"),
    "interpreter_error": dict(interpreter_error="No Python with the backend found"),
    "remote_error": dict(remote="gpu-box:8765", remote_error="Failed: wrong token"),
    "remote worker_error": dict(remote="gpu-box:8765", worker_error="error: authentication failed"),
}


@pytest.mark.parametrize("name", sorted(ERROR_FACTS))
def test_an_error_never_gets_a_check_mark(name):
    line = readiness.check(Facts(**ERROR_FACTS[name])).backend
    assert line.kind == readiness.ERROR and line.icon == "ERROR", line


def test_only_a_checked_state_gets_a_check_mark():
    def kind(**facts) -> str:
        return readiness.check(Facts(**facts)).backend.kind

    stopped = {**READY, "running": False}
    assert kind(**READY) == kind(remote="gpu-box:8765", running=True) == readiness.OK
    assert kind(**READY, starting=True) == kind(interpreter="/venv/bin/python") == readiness.INFO
    assert kind(remote="gpu-box:8765") == kind(**stopped, worker_error="stopped") == readiness.INFO


def test_a_line_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of ok, error, info, got 'warning'"):
        readiness.Line("x", True, kind="warning")


@pytest.mark.parametrize(
    ("source", "text"),
    [
        (readiness.INSTALLED, "Backend installed (starts with the first Generate)"),
        (readiness.SET, "Backend interpreter set: /home/me/venv/bin/python (starts with the first Generate)"),
        ("", "Backend interpreter found: /home/me/venv/bin/python (starts with the first Generate)"),
    ],
)
def test_a_backend_not_started_says_which_python_and_where_it_came_from(source, text):
    facts = Facts(interpreter="/home/me/venv/bin/python", interpreter_source=source)
    assert readiness.check(facts).backend.text == text


@pytest.mark.parametrize(
    "model, state, text, offered",
    [
        ("owner/sd-model", "missing", "Model not on disk: owner/sd-model", ["sdtex.download_model", ON_DISK, CHOOSE]),
        ("owner/sd-model", "partial", "Model download incomplete: owner/sd-model", ["sdtex.download_model", CHOOSE]),
        ("/gone/model.safetensors", "missing", "Model not found: /gone/model.safetensors", [ON_DISK, CHOOSE]),
        ("/home/me/photos", "invalid", "Not a model", [ON_DISK, CHOOSE]),
        ("", "invalid", "No model chosen", [ON_DISK, CHOOSE]),
    ],
)  # fmt: skip
def test_a_model_not_on_disk_blocks_generate_with_its_fix(model, state, text, offered):
    ready = readiness.check(Facts(**{**READY, "model": model, "model_state": state}))
    assert ready.blocker.startswith(text) and ready.model.text.startswith(text)
    assert fixes(ready.model) == offered


def test_downloading_shows_the_transfer():
    facts = Facts(**{**READY, "model_state": "missing"}, downloading=True, download_progress=0.25, download_text="x")
    line = readiness.check(facts).model
    assert (line.ready, line.progress, line.icon) == (False, 0.25, "SORTTIME")


def test_download_events_become_the_jobs_status():
    job = Job(client=None, request_id="d1", task="download_model")
    job.handle({"id": "d1", "event": "download", "data": {
        "bytes_done": 312_000_000, "bytes_total": 2_100_000_000, "files_done": 3, "files_total": 9,
        "speed": 14_000_000.0, "elapsed": 20.0,
    }})  # fmt: skip
    progress = {"step": 312_000_000, "total": 2_100_000_000, "elapsed": 20.0}
    job.handle({"id": "d1", "event": "progress", "data": progress})
    assert job.status_text == "Downloading 312 MB of 2.1 GB · 14 MB/s"
    assert job.fraction == pytest.approx(312 / 2100)


@pytest.mark.parametrize(
    "message, shown",
    [
        (
            "width must be an integer from 64 to 2048 in multiples of 8, got 501",
            "Width must be an integer from 64 to 2048 in multiples of 8 (you gave 501): try 504",
        ),
        ("guidance_scale must be a number from 0 to 30, got 45", "Guidance must be a number from 0 to 30 (you gave 45)"),  # noqa: E501
        ("prompt must be a non-empty string, got ''", "Prompt is empty: fill it in"),
        ("The model file is damaged\nTraceback: ...", "The model file is damaged\nTraceback: ..."),
        ("colour must be red, got 1", "colour must be red, got 1"),  # not a parameter: left as it is
    ],
)  # fmt: skip
def test_parameter_errors_use_the_panels_labels(message, shown):
    assert messages.readable(message) == shown


def test_models_on_disk_lists_complete_cached_models_and_a_folders_models(tmp_path):
    from blender_sd_addon.contract.model_catalog import local_models

    cache = tmp_path / "hub"
    for repo, complete in (("owner--done", True), ("owner--half", False)):
        snapshot = cache / f"models--{repo}" / "snapshots" / "abc"
        snapshot.mkdir(parents=True)
        (cache / f"models--{repo}" / "refs").mkdir()
        (cache / f"models--{repo}" / "refs" / "main").write_text("abc")
        if complete:
            (snapshot / "model_index.json").write_text("{}")
    mine = tmp_path / "mine"
    (mine / "diffusers-model").mkdir(parents=True)
    (mine / "diffusers-model" / "model_index.json").write_text("{}")
    (mine / "photos").mkdir()
    (mine / "checkpoint.safetensors").write_bytes(b"x")
    (mine / "notes.txt").write_text("not a model")
    assert local_models(cache, (mine, tmp_path / "gone")) == [
        "owner/done",
        str(mine / "checkpoint.safetensors"),
        str(mine / "diffusers-model"),
    ]


def test_an_error_names_its_parameter_so_the_panel_can_clear_it_once_fixed():
    assert messages.parameter_of("prompt must be a non-empty string, got ''") == "prompt"
    assert messages.parameter_of("loras[0].weight must be a number from -4 to 4, got 9") == ""  # not a field
    assert messages.parameter_of("Select one or more mesh objects") == ""


def test_a_remote_backend_needs_no_interpreter_here_and_its_model_is_the_servers():
    facts = Facts(remote="gpu-box:8765", interpreter_error="no local python", model="owner/m", model_state="remote")
    ready = readiness.check(facts)
    assert ready.blocker == ""
    assert ready.backend.text == "Remote backend: gpu-box:8765 (connects with the first Generate)"
    assert ready.backend.icon == "INFO"  # nothing has checked it yet
    assert fixes(ready.backend) == ["sdtex.test_connection"]
    assert ready.model.text == "Model on the server: owner/m"
    running = readiness.check(Facts(remote="gpu-box:8765", running=True, device="cuda", model_state="remote"))
    assert running.backend.text == "Remote backend ready: gpu-box:8765 (cuda)"


def test_a_task_the_backend_cannot_run_says_why_and_offers_a_reinstall():
    reason = "PEFT 0.21.2 is older than transformers 5.24.0 needs (0.22.0)"
    line = readiness.feature_line({"train_lora": reason}, "train_lora")
    assert line.text == f"Training unavailable: {reason}" and not line.ready and line.icon == "ERROR"
    assert line.fixes == (("sdtex.install_backend", "Reinstall Backend"),)
    remote = readiness.feature_line({"train_lora": reason}, "train_lora", remote=True)
    assert remote.text == f"Training unavailable on the server: {reason}" and remote.fixes == ()
    assert readiness.feature_line({}, "train_lora") is None  # a backend that can train, or none started yet
    assert readiness.feature_line({"train_lora": reason}, "txt2img") is None
