"""The Blender-free half of the add-on: client, jobs, history records, paths. No bpy here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from blender_sd_addon import paths, protocol
from blender_sd_addon.client import BACKEND_STOPPED, BackendClient, BackendError, SDTexError
from blender_sd_addon.history import HistoryRecord
from blender_sd_addon.jobs import CANCELLED, FAILED, Job

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_client(mode: str, tmp_path: Path) -> BackendClient:
    return BackendClient([sys.executable, str(FAKE_WORKER), mode], log_path=tmp_path / "backend.log")


# --- client with a scripted worker ----------------------------------------------------------------


def test_protocol_mismatch_says_to_update_both_and_stops_the_worker(tmp_path):
    client = fake_client("wrong_version", tmp_path)
    with pytest.raises(SDTexError) as info:
        client.start(timeout=30)
    message = str(info.value)
    assert "protocol version mismatch" in message and "999" in message
    assert "update the add-on and the backend together" in message
    assert not client.alive


def test_handshake_result_ignores_unknown_fields_and_requests_round_trip(tmp_path):
    client = fake_client("echo", tmp_path)
    try:
        shake = client.start(timeout=30)
        assert (shake.protocol_version, shake.backend_version, shake.devices) == (1, "fake", ["cpu"])
        first = client.submit("load_model", {"model": "a"})
        second = client.submit("load_model", {"model": "b"})
        assert first != second
        # Replies are filed by id: waiting for the second first must not lose the first.
        assert client.result(client.wait(second, timeout=30)) == {"echo": {"model": "b"}}
        assert client.result(client.wait(first, timeout=30)) == {"echo": {"model": "a"}}
    finally:
        client.shutdown()
    assert not client.alive


def test_dead_worker_fails_open_requests_with_its_stderr_and_the_next_request_restarts_it(tmp_path):
    client = fake_client("die_on_generate", tmp_path)
    try:
        client.start(timeout=30)
        first_pid = client.pid
        events = []
        reply = client.wait(client.submit("generate", {}), on_event=events.append, timeout=30)
        assert [e["event"] for e in events] == ["progress"]
        assert reply["error"]["code"] == BACKEND_STOPPED
        assert "backend stopped (exit code 3)" in reply["error"]["message"]
        assert "the fake worker fell over" in reply["error"]["message"]
        with pytest.raises(BackendError, match="exit code 3"):
            client.result(reply)
        assert not client.alive
        assert "the fake worker fell over" in (tmp_path / "backend.log").read_text()

        assert client.request("load_model", {"model": "x"}, timeout=30) == {"echo": {"model": "x"}}
        assert client.alive and client.pid != first_pid
    finally:
        client.shutdown()


def test_missing_interpreter_is_a_clear_error(tmp_path):
    client = BackendClient([str(tmp_path / "no-such-python"), "-m", "backend", "serve"])
    with pytest.raises(SDTexError, match="Cannot start the backend with .*no-such-python"):
        client.start()


def test_wait_times_out_with_a_clear_error(tmp_path):
    client = fake_client("echo", tmp_path)
    try:
        client.start(timeout=30)
        with pytest.raises(SDTexError, match="did not finish within 0.01 s"):
            client.wait("never-sent", timeout=0.01)
    finally:
        client.shutdown()


def test_cancel_reaches_the_worker_while_it_runs_and_gets_a_cancelled_reply(tmp_path):
    client = fake_client("slow", tmp_path)
    try:
        client.start(timeout=30)
        request_id = client.submit(protocol.GENERATE, {})
        job = Job(request_id, {})

        def cancel_at_step_3(message: dict) -> None:
            job.handle(message)
            if job.step == 3:
                client.cancel(request_id)

        job.handle(client.wait(request_id, on_event=cancel_at_step_3, timeout=30))
        assert job.state == CANCELLED and job.status_text == "Cancelled"
        assert 3 <= job.step < 500
        assert client.alive  # a cancel stops the request, not the worker
        assert client.request("load_model", {"model": "y"}, timeout=30) == {"echo": {"model": "y"}}
    finally:
        client.shutdown()


# --- jobs, history, paths --------------------------------------------------------------------------------


def test_job_reports_steps_time_left_and_errors():
    job = Job("r1", {})
    job.handle({"id": "r1", "event": "status", "data": {"stage": "loading_model"}})
    assert job.status_text == "Loading model…"
    job.handle({"id": "r1", "event": "progress", "data": {"step": 2, "total": 10, "elapsed": 3.0}})
    # 1.5 s per step, 8 steps to go
    assert job.status_text == "Step 2/10 · ~12s left"
    assert job.fraction == pytest.approx(0.2)
    job.handle({"id": "r1", "error": {"code": "model_not_found", "message": "model not found: /x"}})
    assert job.state == FAILED and job.finished and job.error_code == "model_not_found"
    assert job.status_text == "Failed: model not found: /x"


def test_job_keeps_the_latest_preview():
    job = Job("r1", {})
    for step in (1, 2):
        job.handle({"id": "r1", "event": "preview", "data": {"step": step, "width": 1, "height": 1, "rgb": "AAAA"}})
    assert job.preview.step == 2 and job.preview_serial == 2


def test_history_record_survives_blender_fields_and_json_with_a_wide_seed():
    result = protocol.GenerateResult.from_dict(
        {
            "images": [{"path": "/t/a.png", "seed": 4_000_000_000, "maps": {"normal": "/t/a_normal.png"}}],
            "seed": 4_000_000_000,
            "width": 64,
            "height": 64,
            "model": "/m",
            "seamless": "xy",
            "timings": {},
            "params": protocol.GenerateParams(
                prompt="brick wall", model="/m", output_dir="/t", seamless="xy", pbr=True
            ).to_dict(),
        }
    )
    record = HistoryRecord.from_result(result)
    fields = record.to_fields()
    assert isinstance(fields["seed"], str) and isinstance(fields["files"], str)
    back = HistoryRecord.from_fields(SimpleNamespace(**fields))
    assert back == record
    assert back.seed == 4_000_000_000
    assert back.images()[0].maps == {"normal": "/t/a_normal.png"}
    assert back.settings()["prompt"] == "brick wall" and back.settings()["seamless"] == "xy"
    assert HistoryRecord.from_json(json.dumps(json.loads(record.to_json()))) == record


def test_interpreter_discovery_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_PYTHON, raising=False)
    addon_dir = tmp_path / "addons" / "blender_sd_addon"
    addon_dir.mkdir(parents=True)
    user_data = tmp_path / "data"

    with pytest.raises(SDTexError, match="Backend interpreter does not exist: .*nope"):
        paths.find_backend_python(str(tmp_path / "nope"), user_data, addon_dir)

    monkeypatch.setattr(paths, "_has_backend_packages", lambda: False)
    with pytest.raises(SDTexError) as info:
        paths.find_backend_python("", user_data, addon_dir)
    assert "backend-venv" in str(info.value) and "Install backend" in str(info.value)

    installed = paths.venv_python(user_data / paths.BACKEND_VENV)
    installed.parent.mkdir(parents=True)
    installed.write_text("")
    assert paths.find_backend_python("", user_data, addon_dir) == str(installed)
    monkeypatch.setenv(paths.ENV_PYTHON, sys.executable)
    assert paths.find_backend_python("", user_data, addon_dir) == sys.executable


def test_backend_pythonpath_prefers_the_bundled_worker(tmp_path):
    addon_dir = tmp_path / "blender_sd_addon"
    addon_dir.mkdir()
    assert paths.backend_pythonpath(addon_dir) == [str(tmp_path)]
    (addon_dir / "worker").mkdir()
    assert paths.backend_pythonpath(addon_dir) == [str(addon_dir / "worker"), str(tmp_path)]


def test_output_folder_beside_the_blend_or_in_user_data(tmp_path):
    blend = str(tmp_path / "scene.blend")
    assert paths.resolve_output_dir("//textures/", blend, tmp_path / "data") == tmp_path / "textures"
    assert paths.resolve_output_dir("//textures/", "", tmp_path / "data") == tmp_path / "data" / "textures"
    assert paths.resolve_output_dir(str(tmp_path / "out"), blend, tmp_path / "data") == tmp_path / "out"
