"""Install the backend: a venv in the user data folder with torch, diffusers and the rest.

Stdlib only and Blender-free: the operators in blender/install_ops.py pass in the user data folder and
the add-on's worker/ folder, and a timer redraws the preferences from `STATE` while a thread runs the
phases. Every output line of pip goes to `STATE.log_lines` and to `<user data>/backend-install.log`.

Torch comes first, on its own: the right build differs per machine (on Linux PyPI's `torch` includes
CUDA; on Windows PyPI's is CPU only, so an NVIDIA GPU needs PyTorch's CUDA index). The user can set
both the requirement and the index URL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import paths

LOG_NAME = "backend-install.log"
DEFAULT_TORCH_SPEC = "torch"
WINDOWS_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
SUPPORTED_PYTHON = ((3, 10), (3, 13))  # inclusive; what torch and diffusers publish wheels for
CHECK_SCRIPT = "import diffusers, torch; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
LOG_LINES_KEPT = 1000  # in memory; the log file keeps everything
TERMINATE_GRACE = 5.0  # seconds between terminate() and kill() on cancel


class InstallError(Exception):
    """The installation cannot start or a phase failed; the message says why."""


class Cancelled(Exception):
    pass


@dataclass
class InstallState:
    """What the preferences show; written by the install thread, read by the UI timer."""

    running: bool = False
    progress: float = 0.0  # 0..1, by phase
    message: str = ""
    error: bool = False  # the last run failed; `message` holds the reason and the log's tail
    cancelled: bool = False
    log_lines: list[str] = field(default_factory=list)
    log_path: Path | None = None
    _process: subprocess.Popen | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def log(self, line: str) -> None:
        self.log_lines.append(line)
        del self.log_lines[:-LOG_LINES_KEPT]
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(line + "\n")


STATE = InstallState()


@dataclass(frozen=True)
class Phase:
    message: str  # shown while it runs
    command: list[str]
    weight: float = 1.0  # share of the progress bar


def venv_dir(user_dir: Path) -> Path:
    return Path(user_dir) / paths.BACKEND_VENV


def venv_python(user_dir: Path) -> Path:
    """The backend venv's interpreter (it may not exist yet)."""
    return paths.venv_python(venv_dir(user_dir))


def _clean_env() -> dict[str, str]:
    # Blender sets PYTHONHOME/PYTHONPATH for its own Python; a child interpreter must not inherit them.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env.update(PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _python_problem(python: str) -> str | None:
    """None if `python` is a supported Python that can create venvs with pip, else what is wrong."""
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
    return None


def find_base_python(preferred: str | None = None) -> str:
    """The interpreter that creates the venv: `preferred` if given, else Blender's own Python, else a
    python3 on PATH. Raises InstallError listing what was tried."""
    if preferred:
        problem = _python_problem(preferred)
        if problem:
            raise InstallError(f"The base Python {preferred} cannot be used: {problem}")
        return preferred
    names = [f"python3.{minor}" for minor in range(SUPPORTED_PYTHON[1][1], SUPPORTED_PYTHON[0][1] - 1, -1)]
    candidates = [sys.executable] + [found for name in (*names, "python3", "python") if (found := shutil.which(name))]
    tried = []
    for python in dict.fromkeys(candidates):
        problem = _python_problem(python)
        if problem is None:
            return python
        tried.append(f"{python}: {problem}")
    raise InstallError(
        "No Python to create the backend environment with. Install Python 3.10 to 3.13 (with venv and pip). "
        "Tried: " + "; ".join(tried or ["no python on PATH"])
    )


def default_torch_index(platform: str = sys.platform, has_nvidia: bool | None = None) -> str:
    """PyTorch's CUDA index on Windows with an NVIDIA GPU; elsewhere PyPI (empty string) has the right build."""
    if has_nvidia is None:
        has_nvidia = shutil.which("nvidia-smi") is not None
    return WINDOWS_CUDA_INDEX if platform == "win32" and has_nvidia else ""


def install_phases(
    user_dir: Path,
    worker_dir: Path,
    base_python: str,
    torch_spec: str = DEFAULT_TORCH_SPEC,
    index_url: str = "",
) -> list[Phase]:
    """The commands that install the backend; an existing venv is reused (a rerun upgrades it)."""
    requirements = Path(worker_dir) / "requirements.txt"
    if not requirements.is_file():
        raise InstallError(
            f"{requirements} is missing: install the add-on from its release zip (built by build_addon.py), "
            "or set Preferences > Backend Interpreter to a Python that has the backend's packages"
        )
    python = str(venv_python(user_dir))
    pip = [python, "-m", "pip", "install", "--upgrade"]
    phases = []
    if not venv_python(user_dir).is_file():
        phases.append(Phase("Creating the backend environment", [base_python, "-m", "venv", str(venv_dir(user_dir))]))
    torch_index = ["--index-url", index_url] if index_url else []
    phases += [
        Phase("Installing torch (a large download)", [*pip, *torch_spec.split(), *torch_index], weight=6),
        Phase("Installing diffusers and the other packages", [*pip, "-r", str(requirements)], weight=3),
        Phase("Checking the backend", [python, "-c", CHECK_SCRIPT]),
    ]
    return phases


def _run(phase: Phase) -> None:
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
    try:
        for line in process.stdout:
            STATE.log(line.rstrip())
        process.wait()
    finally:
        STATE._process = None
    if STATE._cancel.is_set():
        raise Cancelled
    if process.returncode:
        tail = "\n".join(STATE.log_lines[-8:])
        raise InstallError(f"{phase.message} failed (exit code {process.returncode}). Last lines:\n{tail}")


def run_phases(phases: Sequence[Phase]) -> None:
    """Run the phases one after another in this thread, updating STATE. Never raises: the outcome is
    in STATE.message / STATE.error / STATE.cancelled."""
    total = sum(phase.weight for phase in phases) or 1.0
    done = 0.0
    try:
        for phase in phases:
            if STATE._cancel.is_set():
                raise Cancelled
            STATE.message, STATE.progress = phase.message + "…", done / total
            _run(phase)
            done += phase.weight
        STATE.progress, STATE.message = 1.0, "Backend installed"
    except Cancelled:
        STATE.cancelled, STATE.message = True, "Installation cancelled: press Install Backend to start again"
    except InstallError as exc:
        STATE.error, STATE.message = True, str(exc)
    finally:
        STATE.log(STATE.message)
        STATE.running = False


def start_phases(phases: Sequence[Phase], log_path: Path | None = None) -> threading.Thread:
    """Run the phases in a daemon thread (one installation at a time); returns the thread."""
    if STATE.running:
        raise InstallError("An installation is already running")
    STATE.running, STATE.progress, STATE.error, STATE.cancelled = True, 0.0, False, False
    STATE.message, STATE.log_lines, STATE.log_path = "Starting…", [], log_path
    STATE._cancel.clear()
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("", encoding="utf-8")
    thread = threading.Thread(target=run_phases, args=(phases,), daemon=True, name="sdtex-install")
    thread.start()
    return thread


def start_install(
    user_dir: Path,
    worker_dir: Path,
    *,
    base_python: str | None = None,
    torch_spec: str = DEFAULT_TORCH_SPEC,
    index_url: str | None = None,
) -> threading.Thread:
    """Install the backend into `<user_dir>/backend-venv` in a thread; returns the thread.

    base_python: creates the venv (None: Blender's Python, else a python3 on PATH).
    torch_spec: the torch requirement(s), e.g. "torch==2.5.1".
    index_url: pip index for torch (None: chosen for this machine, "" : PyPI).
    Raises InstallError at once when no base Python or no requirements file is found.
    """
    user_dir = Path(user_dir)
    base = "" if venv_python(user_dir).is_file() else find_base_python(base_python)  # only a new venv needs one
    index = default_torch_index() if index_url is None else index_url
    phases = install_phases(user_dir, worker_dir, base, torch_spec, index)
    return start_phases(phases, user_dir / LOG_NAME)


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
