"""Runs the backend worker with a clean import path:  <backend python> worker_launcher.py serve

Executed as a script by the backend's interpreter; Blender never runs it. Stdlib only.

Blender's add-on folders must stay off the worker's sys.path: a sibling add-on's package (a folder named
`numpy`, say) would shadow the worker's libraries. So the launcher
1. removes its own folder and PYTHONPATH's entries from sys.path, and drops PYTHONPATH and PYTHONHOME from
   the environment (the worker's own subprocesses inherit it);
2. puts the folder that holds `backend` and `sdtex_contract` (the contract; the worker imports nothing of the
   add-on) first: worker/ in the built add-on, the checkout in development;
3. runs backend.__main__.main() with its own command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def backend_root(addon_dir: Path) -> Path | None:
    """The folder that holds the `backend` and `sdtex_contract` packages: worker/ in the built add-on, else the
    source checkout."""
    for folder in (addon_dir / "worker", addon_dir.parent):
        if (folder / "backend" / "__init__.py").is_file() and (folder / "sdtex_contract" / "__init__.py").is_file():
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

    # 3. The worker
    from backend.__main__ import main as backend_main

    return backend_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
