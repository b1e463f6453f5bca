"""The runners: one module per task (or family of tasks), each runner marked `@runs("task")` (backend/registry.py).

Importing this package imports every module in it, so a new task is its spec in sdtex_contract/tasks.py and its
module here: nothing else registers it.
"""

from __future__ import annotations

import importlib
import pkgutil

from backend.registry import RUNNERS
from sdtex_contract import protocol

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

TASKS = RUNNERS
if set(TASKS) != set(protocol.SPECS):
    raise ImportError(f"tasks without a runner: {sorted(set(protocol.SPECS) - set(TASKS))}")
