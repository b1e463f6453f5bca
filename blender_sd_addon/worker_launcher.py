"""Runs the backend worker with a clean import path:  <backend python> worker_launcher.py serve

Executed as a script by the backend's interpreter; Blender never runs it. Stdlib only.

Blender's add-on folders must stay off the worker's sys.path: a sibling add-on's package (a folder named
`numpy`, say) would shadow the worker's libraries. So the launcher
1. removes its own folder and PYTHONPATH's entries from sys.path, and drops PYTHONPATH and PYTHONHOME from
   the environment (the worker's own subprocesses inherit it);
2. puts the folder that holds `backend` first: worker/ in the built add-on, the checkout in development;
3. registers `blender_sd_addon` from this folder by path (its __init__ is bpy-free), so the folder that holds
   the add-on (Blender's add-ons folder) is never searched;
4. runs backend.__main__.main() with its own command line.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ADDON_PACKAGE = "blender_sd_addon"  # the name the worker imports the protocol by, whatever the folder is called


def backend_root(addon_dir: Path) -> Path | None:
    """The folder that holds the `backend` package: worker/ in the built add-on, else the source checkout."""
    for folder in (addon_dir / "worker", addon_dir.parent):
        if (folder / "backend" / "__init__.py").is_file():
            return folder
    return None


def _same(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def main(argv: list[str]) -> int:
    addon_dir = Path(__file__).resolve().parent
    root = backend_root(addon_dir)
    if root is None:
        print(f"error: no backend package in {addon_dir / 'worker'} or {addon_dir.parent}", file=sys.stderr)
        return 2

    # 1. Forget where we were started from
    dropped = {_same(str(addon_dir)), _same(str(root))}
    dropped.update(_same(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    for name in ("PYTHONPATH", "PYTHONHOME"):
        os.environ.pop(name, None)

    # 2. The backend first
    sys.path[:] = [str(root)] + [p for p in sys.path if p and _same(p) not in dropped]

    # 3. The add-on package, by path
    spec = importlib.util.spec_from_file_location(
        ADDON_PACKAGE, addon_dir / "__init__.py", submodule_search_locations=[str(addon_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[ADDON_PACKAGE] = package
    spec.loader.exec_module(package)

    # 4. The worker
    from backend.__main__ import main as backend_main

    return backend_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
