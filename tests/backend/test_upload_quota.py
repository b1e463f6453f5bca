"""Uploads on a shared server (backend.inputs): each client's own, within per-client and total quotas, gone
when the client goes or after expiry unused, and left-overs of killed workers removed at the next start."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from worker_process import WorkerProcess

from backend import inputs
from backend.inputs import InputStore, UploadQuota
from sdtex_contract import protocol


@pytest.fixture(autouse=True)
def private_temp(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_each_client_sees_only_its_uploads_and_they_go_with_it():
    store = InputStore(quota=UploadQuota(per_client=100, total=1000))
    alice, bob = store.for_client("alice"), store.for_client("bob")
    digest = alice.put(b"alice's bytes")
    assert alice.path({"sha256": digest}, "image").read_bytes() == b"alice's bytes"
    with pytest.raises(protocol.ProtocolError, match="no upload with sha256"):
        bob.path({"sha256": digest}, "image")
    folder = alice.folder
    alice.close()
    assert not folder.exists() and bob.folder.is_dir()
    store.close()
    assert not store.folder.exists()


def test_over_the_quota_is_a_clear_error_naming_quota_and_size():
    store = InputStore(quota=UploadQuota(per_client=100, total=150))
    alice, bob = store.for_client("alice"), store.for_client("bob")
    alice.put(b"a" * 60)
    with pytest.raises(protocol.ProtocolError) as info:
        alice.put(b"b" * 50)
    assert "upload quota exceeded: this upload is 50 bytes, 60 of the 100 bytes allowed per client" in str(info.value)
    assert info.value.data == {"param": "data", "quota": 100, "used": 60, "size": 50}
    bob.put(b"c" * 80)
    with pytest.raises(protocol.ProtocolError, match="140 of the 150 bytes allowed in all"):
        bob.put(b"d" * 15)
    alice.close()  # her bytes are freed for everyone
    bob.put(b"d" * 15)
    store.close()


def test_unused_uploads_expire(monkeypatch):
    store = InputStore(quota=UploadQuota(per_client=100, total=100, expiry=60.0)).for_client("alice")
    now = [1000.0]
    monkeypatch.setattr(inputs.time, "monotonic", lambda: now[0])
    old = store.put(b"x" * 90)
    now[0] += 61
    store.put(b"y" * 90)  # the old one expired: room again
    with pytest.raises(protocol.ProtocolError, match="no upload"):
        store.path({"sha256": old}, "image")


def test_folders_of_killed_workers_are_removed_at_start(private_temp: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = InputStore().folder
    (stale / inputs.PID_FILE).write_text(dead.stdout.strip())  # its process is gone (killed: no clean-up ran)
    live = InputStore().folder  # this process's own
    foreign = private_temp / f"{inputs.UPLOADS_PREFIX}someone-elses"
    foreign.mkdir()
    (foreign / inputs.PID_FILE).write_text(dead.stdout.strip())  # our prefix, but not our marker
    assert inputs.remove_stale() == [stale]
    assert not stale.exists() and live.is_dir() and foreign.is_dir()
    assert os.getpid() == int((live / inputs.PID_FILE).read_text())


def test_the_stdio_worker_removes_what_a_killed_one_left(private_temp: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = InputStore().folder
    (stale / inputs.PID_FILE).write_text(dead.stdout.strip())
    worker = WorkerProcess()  # inherits TMPDIR: this test's folder
    try:
        reply, _ = worker.call(protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION})
        assert "result" in reply, reply
        assert not stale.exists()
    finally:
        worker.close()
