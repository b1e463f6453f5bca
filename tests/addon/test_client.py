"""The Blender-free half of the add-on: the client against a scripted worker, history records, paths.

The client's debts (supervision, transport, launcher) are in test_client_*.py, jobs in test_jobs.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from blender_sd_addon import paths
from blender_sd_addon.client import BACKEND_START_FAILED, BACKEND_STOPPED, BackendClient, BackendError, SDTexError
from blender_sd_addon.contract import protocol
from blender_sd_addon.history import HistoryRecord

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_client(mode: str, tmp_path: Path) -> BackendClient:
    return BackendClient([sys.executable, str(FAKE_WORKER), mode], log_path=tmp_path / "backend.log")


# --- client with a scripted worker ----------------------------------------------------------------


def test_protocol_mismatch_says_to_update_both_and_stops_the_worker(tmp_path):
    client = fake_client("wrong_version", tmp_path)
    with pytest.raises(BackendError) as info:
        client.start(timeout=30)
    message = str(info.value)
    assert info.value.code == protocol.PROTOCOL_MISMATCH
    assert "protocol version mismatch" in message and "999" in message
    assert "update the add-on and the backend together" in message
    assert not client.alive


def test_missing_capabilities_are_refused_and_queued_requests_get_the_start_error(tmp_path):
    client = fake_client("missing_capabilities", tmp_path)
    request_id = client.submit("load_model", {"model": "a"})  # queued while the worker starts
    reply = client.wait(request_id, timeout=30)
    assert reply["error"]["code"] == protocol.PROTOCOL_MISMATCH
    message = reply["error"]["message"]
    assert "lacks upload, artifacts, fetch, tasks" in message
    assert "update the add-on and the backend together" in message
    assert not client.alive


def test_handshake_result_ignores_unknown_fields_and_requests_round_trip(tmp_path):
    client = fake_client("echo", tmp_path)
    try:
        shake = client.start(timeout=30)
        assert (shake.protocol_version, shake.backend_version, shake.devices) == (2, "fake", ["cpu"])
        assert "fetch" in shake.capabilities and list(shake.tasks) == ["txt2img"]
        assert client.handshake is shake and client.pid
        first = client.submit("load_model", {"model": "a"})
        second = client.submit("load_model", {"model": "b"})
        assert first != second
        # Replies are filed by id: waiting for the second first must not lose the first.
        assert client.result(client.wait(second, timeout=30)) == {"echo": {"model": "b"}}
        assert client.result(client.wait(first, timeout=30)) == {"echo": {"model": "a"}}
        # A collected reply closes the mailbox: nothing is kept for the id.
        assert client.messages(first) == []
        with pytest.raises(SDTexError, match="No open request"):
            client.wait(first, timeout=1)
    finally:
        client.shutdown()
    assert not client.alive and client.handshake is None


def test_submit_returns_at_once_and_requests_queued_during_the_start_go_out_in_order(tmp_path):
    client = fake_client("echo", tmp_path)
    try:
        began = time.monotonic()
        ids = [client.submit("load_model", {"n": n}) for n in range(5)]
        assert time.monotonic() - began < 0.5 and client.starting
        replies = [client.result(client.wait(i, timeout=30)) for i in ids]
        assert replies == [{"echo": {"n": n}} for n in range(5)]
        assert client.alive and not client.starting
    finally:
        client.shutdown()


def test_dead_worker_fails_open_requests_with_its_traceback_and_the_next_request_restarts_it(tmp_path):
    client = fake_client("die_on_run", tmp_path)
    try:
        client.start(timeout=30)
        first_pid = client.pid
        events = []
        reply = client.wait(client.submit(protocol.RUN, {"task": "txt2img"}), on_event=events.append, timeout=30)
        assert [e["event"] for e in events] == ["progress"]
        assert reply["error"]["code"] == BACKEND_STOPPED
        with pytest.raises(BackendError, match="exit code 3"):
            client.result(reply)
        assert not client.alive
        assert "the fake worker fell over" in (tmp_path / "backend.log").read_text()

        assert client.request("load_model", {"model": "x"}, timeout=30) == {"echo": {"model": "x"}}
        assert client.alive and client.pid != first_pid
    finally:
        client.shutdown()


def test_missing_interpreter_is_a_clear_error(tmp_path):
    client = BackendClient([str(tmp_path / "no-such-python"), "serve"])
    with pytest.raises(BackendError, match="Cannot start the backend with .*no-such-python") as info:
        client.start(timeout=10)
    assert info.value.code == BACKEND_START_FAILED
    reply = client.wait(client.submit("load_model", {}), timeout=10)  # submit reports it as the reply
    assert reply["error"]["code"] == BACKEND_START_FAILED


def test_wait_timeout_cancels_and_forgets_the_request(tmp_path):
    client = fake_client("slow", tmp_path)
    try:
        request_id = client.submit(protocol.RUN, {"task": "txt2img"})
        with pytest.raises(SDTexError, match="did not finish within 0.5 s; the request was cancelled"):
            client.wait(request_id, timeout=0.5)
        # The worker got the cancel (it is free for the next request) and the late reply was dropped.
        assert client.request("load_model", {"model": "y"}, timeout=30) == {"echo": {"model": "y"}}
        assert client.messages(request_id) == []
        assert request_id not in client._rpc._mail
    finally:
        client.shutdown()


def test_forget_drops_the_mailbox_and_later_messages(tmp_path):
    client = fake_client("echo", tmp_path)
    try:
        client.start(timeout=30)
        forgotten = client.submit("load_model", {"model": "a"})
        client.forget(forgotten)
        client.request("load_model", {"model": "b"}, timeout=30)  # the worker answers in order: a came first
        assert client.messages(forgotten) == [] and client._rpc._mail == {}
    finally:
        client.shutdown()


def test_cancel_reaches_the_worker_while_it_runs_and_gets_a_cancelled_reply(tmp_path):
    client = fake_client("slow", tmp_path)
    try:
        client.start(timeout=30)
        request_id = client.submit(protocol.RUN, {"task": "txt2img"})
        steps = []

        def cancel_at_step_3(message: dict) -> None:
            steps.append(message["data"].get("step"))
            if message["data"].get("step") == 3:
                client.cancel(request_id)

        reply = client.wait(request_id, on_event=cancel_at_step_3, timeout=30)
        assert reply == {"id": request_id, "cancelled": True}
        with pytest.raises(SDTexError, match="Cancelled"):
            client.result(reply)
        assert 3 <= max(s for s in steps if s) < 500
        assert client.alive  # a cancel stops the request, not the worker
    finally:
        client.shutdown()


def test_cancel_before_the_worker_started_answers_at_once_and_never_sends(tmp_path):
    client = fake_client("slow_handshake", tmp_path)
    try:
        request_id = client.submit(protocol.RUN, {"task": "txt2img"})
        client.cancel(request_id)
        assert client.wait(request_id, timeout=1) == {"id": request_id, "cancelled": True}
    finally:
        client.shutdown()


def test_upload_is_sent_once_per_worker_process(tmp_path):
    client = fake_client("echo", tmp_path)
    data = b"\x89PNG fake bytes" * 100
    try:
        digest = client.upload(data, timeout=30)
        assert digest == hashlib.sha256(data).hexdigest()
        assert client.upload(data, timeout=30) == digest
        assert client.request("stats", timeout=30) == {"uploads": 1}
        client.upload(b"other", timeout=30)
        assert client.request("stats", timeout=30) == {"uploads": 2}

        client.shutdown()  # a new worker process holds nothing: the bytes go again
        assert client.upload(data, timeout=30) == digest
        assert client.request("stats", timeout=30) == {"uploads": 1}
    finally:
        client.shutdown()


def test_fetch_joins_the_chunks(tmp_path):
    client = fake_client("echo", tmp_path)
    artifact = tmp_path / "a.png"
    artifact.write_bytes(bytes(range(256)) * 10)  # 2560 bytes: three chunks of at most 1000
    try:
        assert client.fetch(str(artifact), timeout=30) == artifact.read_bytes()
        empty = tmp_path / "empty.png"
        empty.write_bytes(b"")
        assert client.fetch(str(empty), timeout=30) == b""
    finally:
        client.shutdown()


# --- history, paths --------------------------------------------------------------------------------


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


def test_worker_command_runs_the_launcher():
    command = paths.worker_command("/py/bin/python")
    assert command == ["/py/bin/python", str(paths.ADDON_DIR / "worker_launcher.py"), "serve"]
    assert Path(command[1]).is_file()


def test_output_folder_beside_the_blend_or_in_user_data(tmp_path):
    blend = str(tmp_path / "scene.blend")
    assert paths.resolve_output_dir("//textures/", blend, tmp_path / "data") == tmp_path / "textures"
    assert paths.resolve_output_dir("//textures/", "", tmp_path / "data") == tmp_path / "data" / "textures"
    assert paths.resolve_output_dir(str(tmp_path / "out"), blend, tmp_path / "data") == tmp_path / "out"
