"""What Install Backend installs on this computer: the torch build, the base Python and its lock.

Stdlib only and Blender-free (installer.py runs what is chosen here).

- The machine decides the torch build (`detect_machine`, `choose_torch`): an NVIDIA GPU (`nvidia-smi` runs) gets
  PyTorch's CUDA wheel index, Linux and Windows without one get the CPU index (PyPI's Linux torch would pull ~3 GB of
  CUDA libraries that nothing uses), macOS gets PyPI (Metal/MPS). The choice and its expected download and disk size
  are known before anything starts, and the dialog's Torch and Torch Index URL fields override it.
- torch is pinned to TORCH_VERSION, the version the suite ran with (the Makefile installs the same; a test checks
  they agree): the locks were resolved against it, and a newer torch is a combination nobody tested.
- The base Python (Blender's own, else a python3 on PATH) creates the venv; its version and sys.platform pick the
  lock in worker/locks/ (LOCKS; build_addon.py reads the table from this file without importing it).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .contract.units import size_text

TORCH_VERSION = "2.13.0"  # what the tests ran with: the Makefile's `pip install torch==...` says the same
DEFAULT_TORCH_SPEC = f"torch=={TORCH_VERSION}"
PYPI = ""  # the index URL meaning "pip's default index"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEXES = (  # (lowest NVIDIA driver major version, index): the newest CUDA build the driver can run
    (570, "https://download.pytorch.org/whl/cu128"),
    (560, "https://download.pytorch.org/whl/cu126"),
    (0, "https://download.pytorch.org/whl/cu118"),
)
SUPPORTED_PYTHON = ((3, 10), (3, 12))  # inclusive: the Pythons LOCKS has a lock for (numpy 1.26: no 3.13)
# sys.platform -> base Python -> its lock in worker/locks/ (`make lock` checks each installs there from wheels).
# 3.10 (Blender 3.4-4.1's own Python) gets older versions where the tested ones need 3.11 (locks/README.md).
LOCKS = {
    "linux": {"3.10": "backend-linux-py310.txt", "3.11": "backend-linux.txt", "3.12": "backend-linux.txt"},
    "win32": {"3.10": "backend-windows-py310.txt", "3.11": "backend-windows.txt", "3.12": "backend-windows.txt"},
    "darwin": {"3.10": "backend-macos-py310.txt", "3.11": "backend-macos.txt", "3.12": "backend-macos.txt"},
}
MB = 10**6
REQUIREMENTS_MB = 150  # diffusers, transformers, accelerate, scipy, numpy, pillow, safetensors, ... (download)


class InstallError(Exception):
    """The installation cannot start or a phase failed; the message says why, `short` in a line or two."""

    def __init__(self, message: str, short: str = "") -> None:
        super().__init__(message)
        self.short = short or message


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
        label = f"{requirement.strip() or DEFAULT_TORCH_SPEC} from {index or 'PyPI'} (as set in the dialog)"
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


def clean_env() -> dict[str, str]:
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
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30, env=clean_env())
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
