"""Install the backend: a venv in the user data folder with the right torch, diffusers and the rest.

Stdlib only and Blender-free: the operators in blender/install_ops.py pass in the user data folder and
the add-on's worker/ folder, and a timer redraws the preferences from `STATE` while a thread runs the
phases. Every output line of pip goes to `STATE.log_lines` and to `<user data>/backend-install.log`.

1. The machine decides the torch build (`detect_machine`, `choose_torch`): an NVIDIA GPU (`nvidia-smi` runs) gets
   PyTorch's CUDA wheel index, Linux and Windows without one get the CPU index (PyPI's Linux torch would pull
   ~3 GB of CUDA libraries that nothing uses), macOS gets PyPI (Metal/MPS). The choice and its expected download
   and disk size are known before anything starts, and the preferences' requirement and index URL override it.
2. Free disk space is checked first, in the user data folder.
3. Everything installs into a new folder (`backend-venv.new`); only when every phase succeeded does it replace
   `backend-venv` (renames). A failed or cancelled installation deletes the new folder and leaves the previous
   backend as it was.
4. pip runs with `--progress-bar raw`: its "Progress X of Y" lines become MB of MB and a speed in STATE; phases
   without them move the bar by phase. After torch, pip installs the platform's and Python's lock (worker/locks/, hashes
   checked). pip, not uv: into a fresh venv uv was 2.4 s against pip's 26 s, but 25 s once it also compiles
   the .pyc files pip writes, and it would need its own download and prints no byte progress.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import paths, safe_remove
from .model_catalog import size_text, transfer_text

LOG_NAME = "backend-install.log"
DEFAULT_TORCH_SPEC = "torch"
PYPI = ""  # the index URL meaning "pip's default index"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEXES = (  # (lowest NVIDIA driver major version, index): the newest CUDA build the driver can run
    (570, "https://download.pytorch.org/whl/cu128"),
    (560, "https://download.pytorch.org/whl/cu126"),
    (0, "https://download.pytorch.org/whl/cu118"),
)
NEW_SUFFIX = ".new"  # the folder an installation builds before it replaces the backend
OLD_SUFFIX = ".old"  # the previous backend, for the moment of the switch
SUPPORTED_PYTHON = ((3, 10), (3, 12))  # inclusive: the Pythons LOCKS has a lock for (numpy 1.26: no 3.13)
# sys.platform -> base Python -> its lock in worker/locks/ (`make lock` checks each installs there from wheels).
# 3.10 (Blender 3.4-4.1's own Python) gets older versions where the tested ones need 3.11 (locks/README.md).
LOCKS = {
    "linux": {"3.10": "backend-linux-py310.txt", "3.11": "backend-linux.txt", "3.12": "backend-linux.txt"},
    "win32": {"3.10": "backend-windows-py310.txt", "3.11": "backend-windows.txt", "3.12": "backend-windows.txt"},
    "darwin": {"3.10": "backend-macos-py310.txt", "3.11": "backend-macos.txt", "3.12": "backend-macos.txt"},
}
CHECK_SCRIPT = "import diffusers, torch; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
LOG_LINES_KEPT = 1000  # in memory; the log file keeps everything
TERMINATE_GRACE = 5.0  # seconds between terminate() and kill() on cancel
MB = 10**6
REQUIREMENTS_MB = 150  # diffusers, transformers, accelerate, scipy, numpy, pillow, safetensors, ... (download)
SPEED_WINDOW = 3.0  # seconds the download speed is averaged over

_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+)")


class InstallError(Exception):
    """The installation cannot start or a phase failed; the message says why."""


class Cancelled(Exception):
    pass


# --- the machine and its torch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What the torch build depends on."""

    system: str  # sys.platform: "linux", "win32", "darwin"
    arch: str  # platform.machine(): "x86_64", "AMD64", "arm64", "aarch64"
    nvidia_gpu: str = ""  # the GPU's name when nvidia-smi runs, else ""
    nvidia_driver: str = ""  # e.g. "575.51.03"

    @property
    def has_nvidia(self) -> bool:
        return bool(self.nvidia_gpu)


def detect_machine(
    system: str | None = None,
    arch: str | None = None,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    which: Callable[[str], str | None] = shutil.which,
) -> Machine:
    """This computer; each probe can be replaced (tests fake `run` and `which`). An NVIDIA GPU counts only when
    `nvidia-smi` is found and exits 0 (a driver without a GPU, or a broken driver, fails)."""
    system = system or sys.platform
    arch = arch or platform.machine()
    gpu = driver = ""
    smi = which("nvidia-smi")
    if smi and system != "darwin":
        try:
            done = run(
                [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=15,
            )
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is not None and done.returncode == 0 and done.stdout.strip():
            first = done.stdout.strip().splitlines()[0]
            gpu, _, driver = (part.strip() for part in first.partition(","))
    return Machine(system, arch, gpu, driver)


_MACHINE: list[Machine] = []


def this_machine() -> Machine:
    """detect_machine() once per session (nvidia-smi takes a moment; dialogs redraw often)."""
    if not _MACHINE:
        _MACHINE.append(detect_machine())
    return _MACHINE[0]


@dataclass(frozen=True)
class TorchChoice:
    """The torch build to install, and what it costs; shown before the installation starts."""

    requirement: str  # pip requirement(s), e.g. "torch" or "torch==2.5.1"
    index_url: str  # "" = PyPI
    label: str  # for people: "CUDA 12.8 build for NVIDIA GeForce RTX 4070"
    download_mb: int  # expected download, torch and the other packages
    disk_mb: int  # free space needed for the new environment (the old one stays until the switch)
    overridden: bool = False  # the preferences' requirement or index URL replaced the machine's choice

    @property
    def summary(self) -> str:
        download, disk = size_text(self.download_mb * MB), size_text(self.disk_mb * MB)
        return f"{self.label}: about {download} to download, {disk} on disk"


def _driver_major(driver: str) -> int:
    match = re.match(r"(\d+)", driver)
    return int(match[1]) if match else 0


def cuda_index(driver: str) -> str:
    """The newest CUDA wheel index the NVIDIA driver runs (an unknown driver gets the newest)."""
    major = _driver_major(driver) or CUDA_INDEXES[0][0]
    return next(index for low, index in CUDA_INDEXES if major >= low)


def choose_torch(machine: Machine, requirement: str = "", index_url: str | None = None) -> TorchChoice:
    """The torch build for `machine`; a non-empty `requirement` or a non-None `index_url` (the preferences)
    overrides the machine's choice ("" = PyPI)."""
    if machine.system == "darwin":
        label, index, download, disk = "PyPI build (Metal on Apple Silicon)", PYPI, 80, 1200
    elif machine.has_nvidia:
        index = cuda_index(machine.nvidia_driver)
        version = index.rsplit("/cu", 1)[1]
        label = f"CUDA {version[:-1]}.{version[-1]} build for {machine.nvidia_gpu}"
        download, disk = (3300, 7000) if machine.system == "win32" else (3000, 7000)
    else:
        label, index, download, disk = "CPU build (no NVIDIA GPU found)", CPU_INDEX, 200, 1500
    overridden = bool(requirement.strip()) or (index_url is not None and index_url != index)
    if index_url is not None:
        index = index_url
    if overridden:
        label = f"{requirement.strip() or DEFAULT_TORCH_SPEC} from {index or 'PyPI'} (set in Preferences)"
    return TorchChoice(
        requirement.strip() or DEFAULT_TORCH_SPEC, index, label, download + REQUIREMENTS_MB, disk, overridden
    )


def check_free_space(folder: Path, needed_mb: int, disk_usage: Callable = shutil.disk_usage) -> None:
    """InstallError naming the folder and the space needed when it lacks `needed_mb` megabytes."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = disk_usage(probe).free
    if free < needed_mb * MB:
        raise InstallError(
            f"Not enough free space in {folder}: the backend needs about {size_text(needed_mb * MB)} and "
            f"{size_text(free)} are free. Free some space, or set Preferences > Backend interpreter to a Python "
            "that already has torch and diffusers."
        )


# --- state the UI draws -------------------------------------------------------------------------------------


@dataclass
class InstallState:
    """What the preferences show; written by the install thread, read by the UI timer."""

    running: bool = False
    progress: float = 0.0  # 0..1: finished phases by weight, plus the running phase's download share
    message: str = ""  # the running phase, or the outcome
    detail: str = ""  # the download now: "torch-2.5.1-….whl: 312 MB of 906 MB · 14 MB/s"
    error: bool = False  # the last run failed; `message` holds the reason and the log's tail
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


def _clean_env() -> dict[str, str]:
    # Blender sets PYTHONHOME/PYTHONPATH for its own Python; a child interpreter must not inherit them.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env.update(PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


class BasePython(NamedTuple):
    """The interpreter that creates the venv, and its version ("3.11"), which picks the lock."""

    path: str
    version: str


def _probe_python(python: str) -> BasePython | str:
    """`python` if it is a supported Python that can create venvs with pip, else what is wrong."""
    if not Path(python).name.lower().startswith("python"):  # e.g. the blender binary: never run it with -c
        return "not a Python interpreter"
    probe = "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30, env=_clean_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode:
        return "cannot create venvs with pip (" + (done.stderr.strip().splitlines() or ["no venv/ensurepip"])[-1] + ")"
    try:
        version = tuple(int(part) for part in done.stdout.strip().split("."))
    except ValueError:
        return f"unexpected version output {done.stdout.strip()!r}"
    low, high = SUPPORTED_PYTHON
    if not low <= version <= high:
        return f"Python {done.stdout.strip()} is not supported (needs {low[0]}.{low[1]} to {high[0]}.{high[1]})"
    return BasePython(python, f"{version[0]}.{version[1]}")


def find_base_python(preferred: str | None = None) -> BasePython:
    """The interpreter that creates the venv: `preferred` if given, else Blender's own Python, else a
    python3 on PATH. Raises InstallError listing what was tried."""
    if preferred:
        found = _probe_python(preferred)
        if isinstance(found, str):
            raise InstallError(f"The base Python {preferred} cannot be used: {found}")
        return found
    names = [f"python3.{minor}" for minor in range(SUPPORTED_PYTHON[1][1], SUPPORTED_PYTHON[0][1] - 1, -1)]
    candidates = [sys.executable] + [found for name in (*names, "python3", "python") if (found := shutil.which(name))]
    tried = []
    for python in dict.fromkeys(candidates):
        found = _probe_python(python)
        if isinstance(found, BasePython):
            return found
        tried.append(f"{python}: {found}")
    raise InstallError(
        f"No Python to create the backend environment with. Install Python 3.{SUPPORTED_PYTHON[0][1]} to "
        f"3.{SUPPORTED_PYTHON[1][1]} (with venv and pip). "
        "Tried: " + "; ".join(tried or ["no python on PATH"])
    )


def lock_name(system: str, python_version: str) -> str:
    """The lock in worker/locks/ for sys.platform `system` and a base Python "3.X"."""
    by_python = LOCKS.get(system)
    if by_python is None:  # no lock is made for it: install_phases says it is missing
        return f"backend-{system}.txt"
    if python_version not in by_python:
        raise InstallError(f"python_version {python_version!r} has no lock; accepted: {', '.join(by_python)}")
    return by_python[python_version]


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


def _run(phase: Phase, done_weight: float, total_weight: float) -> None:
    STATE.log(f"$ {subprocess.list2cmdline(phase.command)}")
    try:
        process = subprocess.Popen(
            phase.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=_clean_env(),
        )
    except OSError as exc:
        raise InstallError(f"{phase.message} failed: {exc}") from exc
    STATE._process = process
    if STATE._cancel.is_set():  # cancelled while the command was starting
        process.terminate()
    phase_start = STATE.downloaded
    try:
        for raw in process.stdout:
            line = raw.rstrip()
            if _read_progress(line):
                if phase.download_mb:  # the phase's share of the bar follows its bytes (at most 95 %)
                    got = STATE.downloaded - phase_start + STATE.file_done
                    share = min(got / (phase.download_mb * MB), 0.95)
                    STATE.progress = (done_weight + phase.weight * share) / total_weight
            else:
                STATE.log(line)
        process.wait()
    finally:
        STATE._process = None
    STATE.downloaded += STATE.file_done
    STATE.file_done = STATE.file_total = 0
    STATE.current_file, STATE.detail = "", ""
    if STATE._cancel.is_set():
        raise Cancelled
    if process.returncode:
        tail = "\n".join(STATE.log_lines[-8:])
        raise InstallError(f"{phase.message} failed (exit code {process.returncode}). Last lines:\n{tail}")


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
        STATE.error, STATE.message = True, str(exc)
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
    torch_spec: the torch requirement(s), e.g. "torch==2.5.1" ("" = "torch").
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
