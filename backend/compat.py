"""Installed versions known not to work together, found once when the worker starts.

pyproject.toml's ranges allow releases that break each other (transformers 5.24.0 refuses PEFT below 0.22.0
while the newest PEFT is 0.21.2); the lock avoids them, but a hand-made interpreter may not. A library that
refuses another below some version states that floor in its own code: it is read from there, so the check holds
for whatever release is installed. The handshake reports what is off (`unavailable`: task -> reason), and a
request for such a task is refused at once with that reason instead of a traceback in the middle of the job.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib import metadata

from packaging.version import Version

from sdtex_contract.protocol import INVALID_PARAMS, ProtocolError

# (library, the module holding its MIN_PEFT_VERSION): train_lora's adapters go through both.
PEFT_FLOORS = (("transformers", "transformers.integrations.peft"), ("diffusers", "diffusers.utils.constants"))
NEEDS_PEFT = ("train_lora",)
FIX = "reinstall the backend (Preferences > Install Backend) or install the versions in the add-on's lock"


def peft_problem() -> str:
    """Why the installed PEFT cannot serve the installed transformers or diffusers ("" when it can)."""
    try:
        installed = metadata.version("peft")
    except metadata.PackageNotFoundError:
        return "PEFT is not installed"
    for library, module in PEFT_FLOORS:
        floor = getattr(importlib.import_module(module), "MIN_PEFT_VERSION", None)
        if floor and Version(installed) < Version(floor):
            return f"PEFT {installed} is older than {library} {metadata.version(library)} needs ({floor})"
    return ""


@cache
def unavailable() -> dict[str, str]:
    """Task -> why it cannot run with the installed packages (empty when all can); checked once per process."""
    problem = peft_problem()
    return dict.fromkeys(NEEDS_PEFT, problem) if problem else {}


def check_task(task: str) -> None:
    """ProtocolError naming the task and the reason when it cannot run here; nothing when it can."""
    reason = unavailable().get(task)
    if reason:
        raise ProtocolError(INVALID_PARAMS, f"task {task} is unavailable in this backend: {reason}; {FIX}",
                            {"param": "task", "unavailable": reason})
