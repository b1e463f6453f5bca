"""Install the backend: a venv in the user data folder with the right torch, diffusers and the rest.

Stdlib only and Blender-free: the operators in blender/install_ops.py pass in the user data folder and
the add-on's worker/ folder, and a timer redraws the preferences from `STATE` while a thread runs the
phases. Every output line of pip goes to `STATE.log_lines` and to `<user data>/backend-install.log`.

1. What to install (installer_choice.py): the torch build for this machine, pinned to the tested TORCH_VERSION,
   and the lock for the base Python; the choice and its expected download and disk size are known before
   anything starts.
2. Free disk space is checked first, in the user data folder.
3. Everything installs into a new folder (`backend-venv.new`); only when every phase succeeded does it replace
   `backend-venv` (renames). A failed or cancelled installation deletes the new folder and leaves the previous
   backend as it was.
4. pip runs with `--progress-bar raw`: its "Progress X of Y" lines become MB of MB and a speed in STATE; phases
   without them move the bar by phase. After torch, pip installs the platform's and Python's lock (worker/locks/, hashes
   checked). pip, not uv: into a fresh venv uv was 2.4 s against pip's 26 s, but 25 s once it also compiles
   the .pyc files pip writes, and it would need its own download and prints no byte progress.
5. A phase ends when its process exits, even while a child it left keeps the output pipe open; a failure says
   its cause and fix in a line or two (installer_errors.py) and names the log, which has pip's whole output.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import paths
from .contract import safe_remove
from .contract.units import transfer_text

# Re-exported (`X as X`): callers and tests have always found these here.
from .installer_choice import CPU_INDEX as CPU_INDEX
from .installer_choice import (
    DEFAULT_TORCH_SPEC,
    MB,
    REQUIREMENTS_MB,
    BasePython,
    InstallError,
    Machine,
    TorchChoice,
    check_free_space,
    choose_torch,
    clean_env,
    find_base_python,
    lock_name,
    this_machine,
)
from .installer_choice import LOCKS as LOCKS
from .installer_choice import SUPPORTED_PYTHON as SUPPORTED_PYTHON
from .installer_choice import TORCH_VERSION as TORCH_VERSION
from .installer_choice import detect_machine as detect_machine
from .installer_errors import explain

LOG_NAME = "backend-install.log"
NEW_SUFFIX = ".new"  # the folder an installation builds before it replaces the backend
OLD_SUFFIX = ".old"  # the previous backend, for the moment of the switch
CHECK_SCRIPT = "import diffusers, torch; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
LOG_LINES_KEPT = 1000  # in memory; the log file keeps everything
TERMINATE_GRACE = 5.0  # seconds between terminate() and kill() on cancel
SPEED_WINDOW = 3.0  # seconds the download speed is averaged over
OUTPUT_GRACE = 1.0  # seconds the output of an exited command is still read (what it printed last)
PHASE_LINES_KEPT = 400  # of the running phase, searched for a failure's cause
POLL = 0.2  # seconds between checks whether the command has exited

_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+)")


class Cancelled(Exception):
    pass


# --- state the UI draws -------------------------------------------------------------------------------------


@dataclass
class InstallState:
    """What the preferences show; written by the install thread, read by the UI timer."""

    running: bool = False
    progress: float = 0.0  # 0..1: finished phases by weight, plus the running phase's download share
    message: str = ""  # the running phase, or the outcome
    detail: str = ""  # the download now: "torch-2.5.1-….whl: 312 MB of 906 MB · 14 MB/s"
    error: bool = False  # the last run failed; `message` holds the cause, the fix and the log's path
    short_error: str = ""  # ... and this, the cause and fix in a line or two (the sidebar)
    cancelled: bool = False
    succeeded: bool = False  # the last run installed and switched: start the backend now
    choice: TorchChoice | None = None  # what this run installs
    current_file: str = ""  # what pip downloads now
    file_done: int = 0  # bytes of current_file so far
    file_total: int = 0
    downloaded: int = 0  # bytes downloaded by this run, all files
    speed: float = 0.0  # bytes per second over the last few seconds
    log_lines: list[str] = field(default_factory=list)
    log_path: Path | None = None
    _process: subprocess.Popen | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _samples: list[tuple[float, int]] = field(default_factory=list)

    def log(self, line: str) -> None:
        self.log_lines.append(line)
        del self.log_lines[:-LOG_LINES_KEPT]
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(line + "\n")

    def reset(self, log_path: Path | None = None, choice: TorchChoice | None = None) -> None:
        self.running, self.progress, self.error, self.cancelled, self.succeeded = True, 0.0, False, False, False
        self.message, self.detail, self.log_lines, self.log_path, self.choice = "Starting…", "", [], log_path, choice
        self.short_error = ""
        self.current_file, self.file_done, self.file_total, self.downloaded, self.speed = "", 0, 0, 0, 0.0
        self._samples = []
        self._cancel.clear()


STATE = InstallState()


@dataclass(frozen=True)
class Phase:
    message: str  # shown while it runs
    command: list[str]
    weight: float = 1.0  # share of the progress bar
    download_mb: int = 0  # what it is expected to download: its bar follows pip's bytes when it reports them


def venv_dir(user_dir: Path) -> Path:
    return Path(user_dir) / paths.BACKEND_VENV


def new_venv_dir(user_dir: Path) -> Path:
    return Path(user_dir) / (paths.BACKEND_VENV + NEW_SUFFIX)


def venv_python(user_dir: Path) -> Path:
    """The backend venv's interpreter (it may not exist yet)."""
    return paths.venv_python(venv_dir(user_dir))


def install_phases(
    user_dir: Path,
    worker_dir: Path,
    base_python: BasePython,
    torch_spec: str = DEFAULT_TORCH_SPEC,
    index_url: str = "",
    choice: TorchChoice | None = None,
    system: str = sys.platform,
) -> list[Phase]:
    """The commands that build the backend in the new folder (new_venv_dir), from scratch each time (pip's
    cache keeps a rerun's downloads short). `choice` gives the expected download of the torch phase.

    torch first, from the index chosen for the machine; then the lock for `system` (sys.platform) and the base
    Python's version: every other package at the version tested with the others (on 3.10 an older one where that
    needs 3.11), each file checked against its hash. pip's hash checking accepts the torch already there (the
    lock leaves torch out) and refuses anything the lock lacks."""
    lock = Path(worker_dir) / "locks" / lock_name(system, base_python.version)
    if not lock.is_file():
        raise InstallError(
            f"{lock} is missing: install the add-on from its release zip (built by build_addon.py), "
            "or set Preferences > Backend interpreter to a Python that has the backend's packages"
        )
    new = new_venv_dir(user_dir)
    python = str(paths.venv_python(new))
    # --progress-bar raw (pip 24.1+) prints "Progress <bytes> of <bytes>" lines; venvs start with the Python's
    # bundled pip, which may be older, so pip is upgraded first.
    pip = [python, "-m", "pip", "install", "--upgrade", "--progress-bar", "raw"]
    torch_index = ["--index-url", index_url] if index_url else []
    torch_mb = (choice.download_mb - REQUIREMENTS_MB) if choice else 0
    return [
        Phase("Creating the backend environment", [base_python.path, "-m", "venv", str(new)]),
        Phase("Updating pip", [python, "-m", "pip", "install", "--upgrade", "pip"]),
        Phase("Installing torch (a large download)", [*pip, *torch_spec.split(), *torch_index], 6, torch_mb),
        Phase("Installing diffusers and the other packages", [*pip, "--require-hashes", "-r", str(lock)], 3,
              REQUIREMENTS_MB),
        Phase("Checking the backend", [python, "-c", CHECK_SCRIPT]),
    ]


# --- running ------------------------------------------------------------------------------------------------


def _read_progress(line: str) -> bool:
    """Update STATE's download fields from one pip output line; True when it was a progress line (not logged)."""
    if match := _PROGRESS.match(line):
        done, total = int(match[1]), int(match[2])
        if done < STATE.file_done:  # a new file started without a "Downloading" line
            STATE.downloaded += STATE.file_done
        STATE.file_done, STATE.file_total = done, total
        now = time.monotonic()
        current = STATE.downloaded + done
        STATE._samples.append((now, current))
        while len(STATE._samples) > 2 and now - STATE._samples[1][0] > SPEED_WINDOW:
            del STATE._samples[0]
        (then, before) = STATE._samples[0]
        STATE.speed = (current - before) / (now - then) if now > then else 0.0
        name = STATE.current_file or "download"
        STATE.detail = f"{name}: {transfer_text(done, total, STATE.speed)}"
        return True
    if match := _DOWNLOADING.match(line):
        STATE.downloaded += STATE.file_done  # the previous file is complete
        STATE.current_file, STATE.file_done, STATE.file_total = match[1].rsplit("/", 1)[-1], 0, 0
    return False


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Copy a command's output lines into `lines`, then None (its end: every writer closed the pipe)."""
    try:
        for raw in stream:
            lines.put(raw.rstrip())
    except (OSError, ValueError):  # the pipe broke: what came is what there is
        pass
    lines.put(None)


def _output(process: subprocess.Popen, lines: queue.Queue[str | None]) -> Iterator[str]:
    """The command's output lines until it exits, not until the pipe closes: a child it left running (a build
    helper, a keyring) would hold the pipe open and keep the bar at its last value long after the end."""
    exited_at = None
    while True:
        try:
            line = lines.get(timeout=POLL)
        except queue.Empty:
            pass
        else:
            if line is None:
                return
            yield line
        if exited_at is None and process.poll() is not None:
            exited_at = time.monotonic()
        late = time.monotonic() - exited_at if exited_at is not None else 0.0
        if late > OUTPUT_GRACE and (lines.empty() or late > 5 * OUTPUT_GRACE):  # the child may keep printing
            return


def _start(phase: Phase) -> subprocess.Popen:
    STATE.log(f"$ {subprocess.list2cmdline(phase.command)}")
    try:
        return subprocess.Popen(
            phase.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=clean_env(),
        )
    except OSError as exc:
        raise InstallError(f"{phase.message} failed: {exc}") from exc


def _run(phase: Phase, done_weight: float, total_weight: float) -> None:
    process = _start(phase)
    STATE._process = process
    if STATE._cancel.is_set():  # cancelled while the command was starting
        process.terminate()
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True, name="sdtex-install-output").start()
    phase_start = STATE.downloaded
    said: deque[str] = deque(maxlen=PHASE_LINES_KEPT)  # this phase's words, for the cause of a failure
    try:
        for line in _output(process, lines):
            if not _read_progress(line):
                STATE.log(line)
                said.append(line)
            elif phase.download_mb:  # the phase's share of the bar follows its bytes (at most 95 %)
                got = STATE.downloaded - phase_start + STATE.file_done
                share = min(got / (phase.download_mb * MB), 0.95)
                STATE.progress = (done_weight + phase.weight * share) / total_weight
        process.wait()
    finally:
        STATE._process = None
    STATE.downloaded += STATE.file_done
    STATE.file_done = STATE.file_total = 0
    STATE.current_file, STATE.detail = "", ""
    if STATE._cancel.is_set():
        raise Cancelled
    if process.returncode:
        failure = explain(phase.message, process.returncode, list(said), STATE.log_path)
        raise InstallError(failure.message, failure.short)


def switch_to_new(user_dir: Path) -> None:
    """Replace the backend venv by the freshly built one: two renames, the old folder deleted after.

    A venv's own python works from its new path (console scripts keep the old path; the add-on runs only
    `python`). If the old backend cannot be moved (Windows, while it runs), the new folder stays for the next run
    to rebuild, and the old backend keeps working."""
    current, new = venv_dir(user_dir), new_venv_dir(user_dir)
    old = Path(str(current) + OLD_SUFFIX)
    _adopt_earlier_venv(current)
    _remove(old, user_dir)
    try:
        if current.exists():
            current.rename(old)
        new.rename(current)
    except OSError as exc:
        if old.exists() and not current.exists():
            old.rename(current)  # put the previous backend back
        raise InstallError(
            f"The new backend is built but could not replace {current} ({exc.strerror or exc}): stop the backend "
            "(Preferences > Stop Backend) and install again"
        ) from exc
    safe_remove.remove_quietly(old, user_dir)  # the new backend works; a leftover old folder is harmless


def _adopt_earlier_venv(venv: Path) -> None:
    """Installers before the marker made this venv at this path of ours: it is ours to replace."""
    if (venv / "pyvenv.cfg").is_file() and not venv.is_symlink() and not safe_remove.is_ours(venv):
        safe_remove.claim_existing(venv)


def _remove(folder: Path, user_dir: Path) -> None:
    try:
        safe_remove.remove(folder, user_dir)
    except OSError as exc:
        raise InstallError(f"{folder} is in the way and was not removed ({exc}): move it elsewhere") from exc


def run_phases(phases: Sequence[Phase], user_dir: Path | None = None) -> None:
    """Run the phases one after another in this thread, updating STATE; with `user_dir`, switch to the new
    venv on success and delete it on failure or cancel. Never raises: the outcome is in STATE.message /
    STATE.error / STATE.cancelled / STATE.succeeded."""
    total = sum(phase.weight for phase in phases) or 1.0
    done = 0.0
    try:
        for phase in phases:
            if STATE._cancel.is_set():
                raise Cancelled
            STATE.message, STATE.progress = phase.message + "…", done / total
            _run(phase, done, total)
            done += phase.weight
        if user_dir is not None:
            if STATE._cancel.is_set():
                raise Cancelled
            STATE.message = "Switching to the new backend…"
            switch_to_new(user_dir)
        STATE.progress, STATE.message, STATE.succeeded = 1.0, "Backend installed", True
    except Cancelled:
        STATE.cancelled = True
        STATE.message = "Installation cancelled; the previous backend is unchanged"
    except InstallError as exc:
        STATE.error, STATE.message, STATE.short_error = True, str(exc), exc.short
    finally:
        if user_dir is not None and not STATE.succeeded:
            safe_remove.remove_quietly(new_venv_dir(user_dir), user_dir)
        STATE.log(STATE.message)
        STATE.running = False


def start_phases(
    phases: Sequence[Phase],
    log_path: Path | None = None,
    user_dir: Path | None = None,
    choice: TorchChoice | None = None,
) -> threading.Thread:
    """Run the phases in a daemon thread (one installation at a time); returns the thread."""
    if STATE.running:
        raise InstallError("An installation is already running")
    if user_dir is not None:
        _remove(new_venv_dir(user_dir), user_dir)  # what an interrupted run (Blender killed) left
        safe_remove.claim(new_venv_dir(user_dir))  # marked before `venv` fills it, so a failed run can delete it
    STATE.reset(log_path, choice)
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("", encoding="utf-8")
    if choice:
        STATE.log(f"Installing: {choice.summary}")
    thread = threading.Thread(target=run_phases, args=(phases, user_dir), daemon=True, name="sdtex-install")
    thread.start()
    return thread


def plan_install(
    user_dir: Path,
    *,
    torch_spec: str = "",
    index_url: str | None = None,
    machine: Machine | None = None,
) -> TorchChoice:
    """What an installation would install here, before starting it (the dialog shows `summary`)."""
    return choose_torch(machine or this_machine(), torch_spec, index_url)


def start_install(
    user_dir: Path,
    worker_dir: Path,
    *,
    base_python: str | None = None,
    torch_spec: str = "",
    index_url: str | None = None,
    machine: Machine | None = None,
    disk_usage: Callable = shutil.disk_usage,
) -> threading.Thread:
    """Build a new backend venv beside `<user_dir>/backend-venv` in a thread and switch to it on success.

    base_python: creates the venv (None: Blender's Python, else a python3 on PATH).
    torch_spec: the torch requirement(s), e.g. "torch==2.5.1" ("" = DEFAULT_TORCH_SPEC, the tested torch).
    index_url: pip index for torch (None: chosen for this machine, "" : PyPI).
    Raises InstallError at once when no base Python or no lock file is found, or the disk is too full.
    """
    if STATE.running:
        raise InstallError("An installation is already running")
    user_dir = Path(user_dir)
    choice = plan_install(user_dir, torch_spec=torch_spec, index_url=index_url, machine=machine)
    base = find_base_python(base_python)
    system = (machine or this_machine()).system
    phases = install_phases(user_dir, worker_dir, base, choice.requirement, choice.index_url, choice, system)
    _remove(new_venv_dir(user_dir), user_dir)  # before measuring the free space it takes up
    check_free_space(user_dir, choice.disk_mb, disk_usage)
    return start_phases(phases, user_dir / LOG_NAME, user_dir, choice)


def cancel_install() -> None:
    """Stop the running installation: terminate the current command (kill it if it lingers)."""
    STATE._cancel.set()
    process = STATE._process
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
