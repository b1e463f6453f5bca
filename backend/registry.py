"""Which function runs each task: a runner marks itself `@runs("name")` in its module under backend/tasks/.

The task's spec (name, help, parameters, result, CLI command) is declared once, in sdtex_contract/tasks.py;
a runner may only register a task that has a spec, and every spec needs a runner (backend/tasks checks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sdtex_contract import protocol

Runner = TypeVar("Runner", bound=Callable)
RUNNERS: dict[str, Callable] = {}  # task name -> run(ctx: JobContext, params) -> its spec's result


def runs(task: str) -> Callable[[Runner], Runner]:
    """Register the decorated function as the runner of `task`."""

    def register(function: Runner) -> Runner:
        if task not in protocol.SPECS:
            raise ValueError(
                f"{function.__module__}.{function.__name__} runs {task!r}, which has no spec in sdtex_contract"
            )
        if task in RUNNERS:
            raise ValueError(f"{task!r} has two runners: {RUNNERS[task].__module__} and {function.__module__}")
        RUNNERS[task] = function
        return function

    return register
