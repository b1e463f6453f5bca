"""Where things are: the backend's interpreter, the worker's command line, the output folder.

Blender-free: the bpy layer passes in what only Blender knows (preferences, the user data folder, the
.blend's path).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .client import SDTexError

ADDON_DIR = Path(__file__).resolve().parent
ENV_PYTHON = "SDTEX_BACKEND_PYTHON"
BACKEND_VENV = "backend-venv"  # created in the user data folder by Preferences > Install backend


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def repo_root(addon_dir: Path = ADDON_DIR) -> Path | None:
    """The source checkout holding the add-on, when it runs from one (the backend package sits beside it)."""
    root = addon_dir.parent
    return root if (root / "backend" / "__init__.py").is_file() else None


def worker_command(python: str, addon_dir: Path = ADDON_DIR) -> list[str]:
    """The worker's command line: the launcher, run by the backend's interpreter. The launcher sets up the
    worker's import path itself (no PYTHONPATH: Blender's add-ons folder must not be on it)."""
    return [python, str(addon_dir / "worker_launcher.py"), "serve"]


def _has_backend_packages() -> bool:
    # find_spec looks without importing: torch must never load into Blender's process.
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))


def find_backend_python(preference: str = "", user_data: Path | None = None, addon_dir: Path = ADDON_DIR) -> str:
    """The interpreter that runs the backend, in order: the preference, $SDTEX_BACKEND_PYTHON, the repo's
    .venv, the venv the installer made in the user data folder, Blender's own Python if it has torch.
    """
    for source, value in (("Preferences > Backend interpreter", preference), (ENV_PYTHON, os.environ.get(ENV_PYTHON))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise SDTexError(f"The backend interpreter set in {source} does not exist: {path}")
            return str(path)
    tried = ["Preferences > Backend interpreter (not set)", f"{ENV_PYTHON} (not set)"]
    candidates = []
    root = repo_root(addon_dir)
    if root:
        candidates.append(venv_python(root / ".venv"))
    if user_data:
        candidates.append(venv_python(user_data / BACKEND_VENV))
    for path in candidates:
        if path.is_file():
            return str(path)
        tried.append(str(path))
    if _has_backend_packages():
        return sys.executable
    tried.append(f"{sys.executable} (has no torch/diffusers)")
    raise SDTexError(
        "No Python with the backend found. Tried: " + "; ".join(tried) + ". "
        "Press Preferences > Add-ons > SD Textures > Install backend, or set the Backend interpreter."
    )


def resolve_output_dir(setting: str, blend_path: str, user_data: Path) -> Path:
    """The absolute output folder. "//" means beside the saved .blend (Blender's convention); for an
    unsaved file it means the user data folder."""
    setting = setting.strip() or "//textures/"
    if setting.startswith("//"):
        return (Path(blend_path).parent / setting[2:]).resolve() if blend_path else user_data / "textures"
    return Path(setting).expanduser().resolve()
