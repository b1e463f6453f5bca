"""The backend installer's phase runner, with real subprocesses standing in for pip (no network)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from blender_sd_addon import installer
from blender_sd_addon.installer import STATE, Phase


def python_phase(message: str, code: str, weight: float = 1.0) -> Phase:
    return Phase(message, [sys.executable, "-u", "-c", code], weight)


def wait_for_line(text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in STATE.log_lines):
        assert STATE.running, f"the installer stopped before printing {text!r}: {STATE.message}"
        assert time.monotonic() < deadline, f"no {text!r} in the log: {STATE.log_lines}"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def idle_installer():
    yield
    if STATE.running:
        installer.cancel_install()
        deadline = time.monotonic() + 30
        while STATE.running and time.monotonic() < deadline:
            time.sleep(0.05)


def test_streams_lines_and_cancels_the_running_command(tmp_path):
    log = tmp_path / "install.log"
    phases = [
        python_phase("Fake download", "import time; print('first', 'line'); time.sleep(60); print('never', 'printed')"),
        python_phase("Next phase", "print('second', 'phase')"),
    ]
    thread = installer.start_phases(phases, log)
    wait_for_line("first line")
    assert STATE.running and STATE.message.startswith("Fake download")

    installer.cancel_install()
    thread.join(timeout=20)  # far less than the command's 60 s sleep

    assert not thread.is_alive() and not STATE.running
    assert STATE.cancelled and not STATE.error
    assert "cancelled" in STATE.message.lower()
    text = log.read_text()  # the commands are logged too: the printed words are joined by print() only
    assert "first line" in text and "never printed" not in text and "second phase" not in text


def test_failure_reports_the_log_tail(tmp_path):
    phases = [
        python_phase("Creating", "print('created')"),
        python_phase("Installing foo", "import sys; print('ERROR: No matching', 'distribution'); sys.exit(3)"),
    ]
    installer.start_phases(phases, tmp_path / "install.log").join(timeout=60)

    assert STATE.error and not STATE.cancelled and not STATE.running
    assert "Installing foo failed (exit code 3)" in STATE.message
    assert "No matching distribution" in STATE.message
    assert STATE.progress < 1.0
    assert "No matching distribution" in (tmp_path / "install.log").read_text()


def test_progress_follows_phase_weights(tmp_path):
    flag = tmp_path / "go"
    wait_for_flag = (
        f"import os, time\nprint('big', 'started')\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.1)"
    )
    phases = [
        python_phase("Small phase", "print('small done')", weight=1),
        python_phase("Big phase", wait_for_flag, weight=3),
    ]
    thread = installer.start_phases(phases)
    wait_for_line("big started")
    assert STATE.progress == pytest.approx(0.25)
    assert STATE.message.startswith("Big phase")

    flag.touch()
    thread.join(timeout=60)
    assert not STATE.error and not STATE.cancelled
    assert STATE.progress == 1.0 and STATE.message == "Backend installed"


def test_a_second_installation_is_refused_while_one_runs(tmp_path):
    installer.start_phases([python_phase("Slow", "import time; print('slow', 'start'); time.sleep(60)")])
    wait_for_line("slow start")
    with pytest.raises(installer.InstallError, match="already running"):
        installer.start_phases([python_phase("Other", "print('other')")])


def test_venv_phase_creates_a_working_python(tmp_path):
    worker = tmp_path / "worker"
    worker.mkdir()
    (worker / "requirements.txt").write_text("diffusers>=0.35\n")
    user = tmp_path / "user data"  # a space, as in real user folders

    phases = installer.install_phases(
        user, worker, installer.find_base_python(), "torch==2.5.1", "https://example.test/whl"
    )
    assert [p.message.split()[0] for p in phases] == ["Creating", "Installing", "Installing", "Checking"]
    assert phases[1].command[-3:] == ["torch==2.5.1", "--index-url", "https://example.test/whl"]
    assert phases[2].command[-2:] == ["-r", str(worker / "requirements.txt")]

    installer.start_phases(phases[:1]).join(timeout=180)
    assert not STATE.error, STATE.message
    python = installer.venv_python(user)
    done = subprocess.run(
        [str(python), "-c", "import sys, pip; print(sys.prefix)"], capture_output=True, text=True, check=True
    )
    assert Path(done.stdout.strip()) == user / "backend-venv"

    # A second run reuses the venv and installs from PyPI when no index is given.
    again = installer.install_phases(user, worker, "", "torch")
    assert [p.message.split()[0] for p in again] == ["Installing", "Installing", "Checking"]
    assert "--index-url" not in again[0].command


def test_missing_requirements_is_a_clear_error(tmp_path):
    with pytest.raises(installer.InstallError, match="requirements.txt is missing"):
        installer.install_phases(tmp_path, tmp_path / "worker", sys.executable)


def test_unusable_base_python_is_named(tmp_path):
    with pytest.raises(installer.InstallError, match="nonexistent"):
        installer.find_base_python(str(tmp_path / "nonexistent" / "python3"))
    blender = tmp_path / "blender"
    blender.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(installer.InstallError, match="not a Python interpreter"):
        installer.find_base_python(str(blender))


def test_torch_index_by_platform():
    assert installer.default_torch_index("win32", has_nvidia=True).startswith("https://download.pytorch.org/whl/cu")
    assert installer.default_torch_index("win32", has_nvidia=False) == ""
    assert installer.default_torch_index("linux", has_nvidia=True) == ""  # PyPI's Linux torch has CUDA
    assert installer.default_torch_index("darwin", has_nvidia=False) == ""


def test_operators_in_blender():
    """The bpy operators: a clear error without worker/ (a source checkout), and cancel while running."""
    bpy = pytest.importorskip("bpy")
    import addon_utils

    assert addon_utils.enable("blender_sd_addon", default_set=True) is not None
    try:
        with pytest.raises(RuntimeError, match="requirements.txt is missing"):
            bpy.ops.sdtex.install_backend()
        assert not STATE.running

        thread = installer.start_phases([python_phase("Slow", "import time; print('slow', 'start'); time.sleep(60)")])
        wait_for_line("slow start")
        assert not bpy.ops.sdtex.install_backend.poll() and bpy.ops.sdtex.install_backend_cancel.poll()
        assert bpy.ops.sdtex.install_backend_cancel() == {"FINISHED"}
        thread.join(timeout=20)
        assert STATE.cancelled and not thread.is_alive()
    finally:
        addon_utils.disable("blender_sd_addon", default_set=True)
