"""The backend installer: machine detection and the torch choice (faked probes), the phase runner with real
subprocesses standing in for pip (no network), pip's download progress, the disk check, and the switch to the new
venv only on success."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blender_sd_addon import installer, installer_choice
from blender_sd_addon.installer import CPU_INDEX, MB, STATE, Machine, Phase

REPO = Path(__file__).resolve().parents[2]
HERE = installer.BasePython(sys.executable, "{}.{}".format(*sys.version_info))  # the suite's Python as the base


def worker_with_lock(tmp_path: Path, system: str = sys.platform, python: str = HERE.version) -> Path:
    """A worker/ folder as the zip lays it out, with a one-line lock for `system` and base Python `python`."""
    worker = tmp_path / "worker"
    (worker / "locks").mkdir(parents=True, exist_ok=True)
    (worker / "locks" / installer.LOCKS[system][python]).write_text("diffusers==0.42.1 --hash=sha256:00\n")
    return worker


def fake_python(tmp_path: Path, version: str) -> str:
    """A "python3" that answers the base Python probe with `version`."""
    python = tmp_path / version / "python3"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho {version}\n")
    python.chmod(0o755)
    return str(python)


def python_phase(message: str, code: str, weight: float = 1.0) -> Phase:
    return Phase(message, [sys.executable, "-u", "-c", code], weight)


def wait_for_line(text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in STATE.log_lines):
        assert STATE.running, f"the installer stopped before printing {text!r}: {STATE.message}"
        assert time.monotonic() < deadline, f"no {text!r} in the log: {STATE.log_lines}"
        time.sleep(0.05)


pytestmark = pytest.mark.usefixtures("idle_installer")


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


def test_failure_says_why_in_one_line_and_names_the_log(tmp_path):
    phases = [
        python_phase("Creating", "print('created')"),
        python_phase("Installing foo", "import sys; print('ERROR: No matching', 'distribution'); sys.exit(3)"),
    ]
    installer.start_phases(phases, tmp_path / "install.log").join(timeout=60)

    assert STATE.error and not STATE.cancelled and not STATE.running
    assert STATE.message.startswith("Installing foo failed: exit code 3: No matching distribution. See the log")
    assert STATE.message.endswith(f"Full output: {tmp_path / 'install.log'}") and "created" not in STATE.message
    assert STATE.short_error == "exit code 3: No matching distribution"
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
    worker = worker_with_lock(tmp_path)
    user = tmp_path / "user data"  # a space, as in real user folders

    phases = installer.install_phases(
        user, worker, installer.find_base_python(), "torch==2.5.1", "https://example.test/whl"
    )
    assert [p.message.split()[0] for p in phases] == ["Creating", "Updating", "Installing", "Installing", "Checking"]
    assert phases[2].command[-3:] == ["torch==2.5.1", "--index-url", "https://example.test/whl"]
    # torch first, then the lock: exact versions, every file checked against its hash
    lock = worker / "locks" / installer.LOCKS[sys.platform][HERE.version]
    assert phases[3].command[-3:] == ["--require-hashes", "-r", str(lock)]
    new = installer.new_venv_dir(user)
    assert phases[0].command[-1] == str(new)  # always a new folder: the backend in use is never touched

    installer.start_phases(phases[:1]).join(timeout=180)
    assert not STATE.error, STATE.message
    done = subprocess.run(
        [str(installer.paths.venv_python(new)), "-c", "import sys, pip; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(done.stdout.strip()) == new


@pytest.mark.parametrize(
    ("system", "python", "lock"),
    [
        ("linux", "3.11", "backend-linux.txt"), ("linux", "3.12", "backend-linux.txt"),
        ("linux", "3.10", "backend-linux-py310.txt"),  # Blender 3.4-4.1's own Python
        ("win32", "3.11", "backend-windows.txt"), ("win32", "3.10", "backend-windows-py310.txt"),
        ("darwin", "3.12", "backend-macos.txt"), ("darwin", "3.10", "backend-macos-py310.txt"),
    ],
)  # fmt: skip
def test_each_platform_and_python_installs_its_own_lock(tmp_path, system, python, lock):
    worker = worker_with_lock(tmp_path, system, python)
    base = installer.BasePython(sys.executable, python)
    phases = installer.install_phases(tmp_path, worker, base, system=system)
    assert phases[0].command[0] == sys.executable
    assert phases[3].command[-3:] == ["--require-hashes", "-r", str(worker / "locks" / lock)]
    other = next(name for name in installer.LOCKS if name != system)
    with pytest.raises(installer.InstallError, match=f"{installer.LOCKS[other][python]} is missing"):
        installer.install_phases(tmp_path, worker, base, system=other)


def test_a_python_without_a_lock_is_a_clear_error(tmp_path):
    worker = worker_with_lock(tmp_path, "linux")
    old = installer.BasePython(sys.executable, "3.9")
    accepted = r"python_version '3\.9' has no lock; accepted: 3\.10, 3\.11, 3\.12"
    with pytest.raises(installer.InstallError, match=accepted):
        installer.install_phases(tmp_path, worker, old, system="linux")


def test_missing_lock_is_a_clear_error(tmp_path):
    lock = installer.LOCKS[sys.platform][HERE.version]
    with pytest.raises(installer.InstallError, match=rf"{lock} is missing.*release zip"):
        installer.install_phases(tmp_path, tmp_path / "worker", HERE)


def test_the_base_pythons_version_comes_with_it(tmp_path):
    assert installer.find_base_python(sys.executable) == HERE
    # Blender 3.4-4.1's Python is accepted (it gets the 3.10 lock); 3.13 has no numpy 1.26 wheels
    python310 = fake_python(tmp_path, "3.10")
    assert installer.find_base_python(python310) == (python310, "3.10")
    with pytest.raises(installer.InstallError, match=r"Python 3\.13 is not supported \(needs 3\.10 to 3\.12\)"):
        installer.find_base_python(fake_python(tmp_path, "3.13"))


def test_unusable_base_python_is_named(tmp_path):
    with pytest.raises(installer.InstallError, match="nonexistent"):
        installer.find_base_python(str(tmp_path / "nonexistent" / "python3"))
    blender = tmp_path / "blender"
    blender.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(installer.InstallError, match="not a Python interpreter"):
        installer.find_base_python(str(blender))


def fake_probes(smi_output: str | None, exit_code: int = 0):
    """`which` and `run` for detect_machine: nvidia-smi absent (None) or present, printing `smi_output`."""
    calls = []

    def which(name):
        return "/usr/bin/nvidia-smi" if smi_output is not None and name == "nvidia-smi" else None

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, exit_code, stdout=smi_output or "", stderr="")

    return which, run, calls


@pytest.mark.parametrize(
    ("system", "arch", "smi", "exit_code", "index", "label"),
    [
        ("linux", "x86_64", "NVIDIA GeForce RTX 4070, 575.51.03", 0, "https://download.pytorch.org/whl/cu128",
         "CUDA 12.8 build for NVIDIA GeForce RTX 4070"),
        ("win32", "AMD64", "NVIDIA RTX A2000, 561.09", 0, "https://download.pytorch.org/whl/cu126", "CUDA 12.6"),
        ("linux", "x86_64", "Tesla T4, 535.104.05", 0, "https://download.pytorch.org/whl/cu118", "CUDA 11.8"),
        ("linux", "x86_64", None, 0, CPU_INDEX, "CPU build"),  # no nvidia-smi
        ("linux", "x86_64", "", 9, CPU_INDEX, "CPU build"),  # nvidia-smi fails: a driver without a GPU
        ("win32", "AMD64", None, 0, CPU_INDEX, "CPU build"),
        ("linux", "aarch64", None, 0, CPU_INDEX, "CPU build"),
        ("darwin", "arm64", None, 0, "", "Metal"),
    ],
)  # fmt: skip
def test_torch_choice_and_pip_command_per_machine(tmp_path, system, arch, smi, exit_code, index, label):
    which, run, calls = fake_probes(smi, exit_code)
    machine = installer.detect_machine(system=system, arch=arch, run=run, which=which)
    assert machine.has_nvidia == (smi is not None and exit_code == 0 and bool(smi))
    if smi is not None:
        assert calls and calls[0][0] == "/usr/bin/nvidia-smi"
    choice = installer.choose_torch(machine)
    assert choice.index_url == index and label in choice.label and not choice.overridden
    assert choice.download_mb > installer.REQUIREMENTS_MB and choice.disk_mb > choice.download_mb
    if machine.has_nvidia:
        assert choice.download_mb >= 3000  # the CUDA build is large: said before starting
    elif system != "darwin":
        assert choice.download_mb < 500

    worker = worker_with_lock(tmp_path, system)
    phases = installer.install_phases(tmp_path, worker, HERE, choice.requirement, choice.index_url, choice, system)
    torch_phase = phases[2]
    python = str(installer.paths.venv_python(installer.new_venv_dir(tmp_path)))
    pinned = f"torch=={installer.TORCH_VERSION}"
    expected = [python, "-m", "pip", "install", "--upgrade", "--progress-bar", "raw", pinned]
    assert torch_phase.command == expected + (["--index-url", index] if index else [])
    assert torch_phase.download_mb == choice.download_mb - installer.REQUIREMENTS_MB


def test_torch_is_pinned_to_the_version_the_makefile_tests_with():
    """Install Backend installs the torch the suite ran with (the Makefile's), unless the dialog says otherwise."""
    makefile = (REPO / "Makefile").read_text()
    tested = set(re.findall(r"pip install -q torch==(\S+)", makefile))
    assert tested == {installer.TORCH_VERSION}
    choice = installer.choose_torch(Machine("linux", "x86_64"))
    assert choice.requirement == f"torch=={installer.TORCH_VERSION}" and not choice.overridden
    assert installer.choose_torch(Machine("linux", "x86_64"), "torch").requirement == "torch"


def test_the_zip_build_reads_the_installers_lock_table():
    spec = importlib.util.spec_from_file_location("build_addon", REPO / "build_addon.py")
    build_addon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_addon)
    wanted = {name for by_python in installer_choice.LOCKS.values() for name in by_python.values()}
    assert set(build_addon.locks(REPO)) == wanted and installer.LOCKS is installer_choice.LOCKS


def test_preferences_override_the_choice():
    machine = Machine("linux", "x86_64", "NVIDIA GeForce RTX 3060", "550.54")
    pinned = installer.choose_torch(machine, "torch==2.5.1")
    assert pinned.requirement == "torch==2.5.1" and pinned.index_url.endswith("/cu118") and pinned.overridden
    pypi = installer.choose_torch(machine, "", "")
    assert pypi.index_url == "" and pypi.overridden and "PyPI" in pypi.label
    same = installer.choose_torch(machine, "", "https://download.pytorch.org/whl/cu118")
    assert not same.overridden


def test_disk_space_is_checked_first(tmp_path):
    worker = worker_with_lock(tmp_path, "linux")
    full = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 300 * MB, 300 * MB)  # noqa: E731
    user = tmp_path / "user data"
    with pytest.raises(installer.InstallError, match="Not enough free space") as info:
        installer.start_install(user, worker, machine=Machine("linux", "x86_64"), disk_usage=full)
    message = str(info.value)
    assert str(user) in message and "1.5 GB" in message and "300 MB are free" in message
    assert not STATE.running and not installer.new_venv_dir(user).exists()


def test_pip_download_progress_becomes_mb_of_mb_and_speed(tmp_path):
    lines = [
        "Collecting torch",
        "  Downloading torch-2.5.1-cp311-cp311-linux_x86_64.whl (200.0 MB)",
        *[f"Progress {n * 20 * MB} of {200 * MB}" for n in range(11)],
        "  Downloading numpy-2.1.0-cp311-cp311-linux_x86_64.whl (16.0 MB)",
        f"Progress {8 * MB} of {16 * MB}",
    ]
    script = "\n".join(
        [
            "import os, sys, time",
            f"for line in {lines!r}:",
            "    print(line, flush=True); time.sleep(0.01)",
            f"while not os.path.exists({str(tmp_path / 'go')!r}): time.sleep(0.05)",
            f"print('Progress {16 * MB} of {16 * MB}', flush=True)",
            "print('Successfully installed numpy torch')",
        ]
    )
    phases = [python_phase("Installing torch", script, weight=4)]
    phases[0] = Phase(phases[0].message, phases[0].command, 4, download_mb=400)
    thread = installer.start_phases(phases + [python_phase("Checking", "print('ok')")])
    deadline = time.monotonic() + 30
    while STATE.file_done != 8 * MB:
        assert time.monotonic() < deadline and STATE.running, STATE.log_lines
        time.sleep(0.02)
    assert STATE.current_file == "numpy-2.1.0-cp311-cp311-linux_x86_64.whl"
    assert STATE.downloaded == 200 * MB and STATE.file_total == 16 * MB
    assert STATE.detail.startswith("numpy-2.1.0-cp311-cp311-linux_x86_64.whl: 8.0 MB of 16 MB")
    assert "/s" in STATE.detail and STATE.speed > 0
    assert STATE.progress == pytest.approx(4 / 5 * 208 / 400, abs=0.01)  # the phase's share follows its bytes
    assert not any(line.startswith("Progress") for line in STATE.log_lines)  # the log keeps pip's words only
    (tmp_path / "go").touch()
    thread.join(timeout=30)
    assert STATE.succeeded and STATE.downloaded == 216 * MB and STATE.detail == ""


def fake_install(user: Path, marker: str, fail: str | None = None) -> list[Phase]:
    """Phases that build a fake venv in the new folder (its python a copy of ours), and optionally fail."""
    new = installer.new_venv_dir(user)
    build = (
        f"import os, shutil; os.makedirs({str(new)!r} + '/bin', exist_ok=True); "
        f"open({str(new / 'marker')!r}, 'w').write({marker!r}); print('built')"
    )
    phases = [python_phase("Creating the backend environment", build)]
    if fail == "fail":
        phases.append(python_phase("Installing torch", "import sys; print('ERROR: no space'); sys.exit(3)"))
    elif fail == "hang":
        phases.append(python_phase("Installing torch", "import time; print('slow', 'download'); time.sleep(60)"))
    phases.append(python_phase("Checking the backend", "print('ok')"))
    return phases


def test_switches_to_the_new_venv_only_on_success(tmp_path):
    user = tmp_path / "user data"
    old = installer.venv_dir(user)
    old.mkdir(parents=True)
    (old / "pyvenv.cfg").write_text("home = /usr/bin\n")  # a venv an earlier installer made (no owner marker)
    (old / "marker").write_text("old")

    installer.start_phases(fake_install(user, "new", fail="fail"), user_dir=user).join(timeout=60)
    assert STATE.error and "Installing torch failed: exit code 3: no space" in STATE.message and not STATE.succeeded
    assert (old / "marker").read_text() == "old" and not installer.new_venv_dir(user).exists()

    thread = installer.start_phases(fake_install(user, "new", fail="hang"), user_dir=user)
    wait_for_line("slow download")
    assert installer.new_venv_dir(user).exists() and (old / "marker").read_text() == "old"
    installer.cancel_install()
    thread.join(timeout=20)
    assert STATE.cancelled and "previous backend is unchanged" in STATE.message
    assert (old / "marker").read_text() == "old" and not installer.new_venv_dir(user).exists()

    installer.start_phases(fake_install(user, "new"), user_dir=user).join(timeout=60)
    assert STATE.succeeded and STATE.message == "Backend installed" and STATE.progress == 1.0
    assert (old / "marker").read_text() == "new"
    assert sorted(p.name for p in user.iterdir()) == ["backend-venv"]  # no .new, no .old left


def test_operators_in_blender():
    """The bpy operators: a clear error without worker/ (a source checkout), and cancel while running."""
    bpy = pytest.importorskip("bpy")
    import addon_utils

    assert addon_utils.enable("blender_sd_addon", default_set=True) is not None
    try:
        with pytest.raises(RuntimeError, match=r"locks/backend-\w+\.txt is missing"):
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


def test_never_deletes_a_folder_in_its_place_that_it_did_not_make(tmp_path):
    user = tmp_path / "user data"
    theirs = installer.new_venv_dir(user)
    theirs.mkdir(parents=True)
    (theirs / "precious.txt").write_text("keep me")
    with pytest.raises(installer.InstallError, match="backend-venv.new is in the way and was not removed"):
        installer.start_phases(fake_install(user, "new"), user_dir=user)
    assert (theirs / "precious.txt").read_text() == "keep me" and not STATE.running

    shutil.rmtree(theirs)
    current = installer.venv_dir(user)
    current.mkdir()
    (current / "precious.txt").write_text("not a venv: someone else's folder")
    installer.start_phases(fake_install(user, "new"), user_dir=user).join(timeout=60)
    assert STATE.succeeded and (current / "marker").read_text() == "new"
    kept = Path(str(current) + installer.OLD_SUFFIX) / "precious.txt"
    assert kept.read_text() == "not a venv: someone else's folder"  # moved aside, never deleted
