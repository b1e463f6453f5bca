"""GUI-test fixtures: the tools they need, which CI must have (a missing one fails there, skips elsewhere)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (apt-get install blender xvfb): the GUI tests need it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def require() -> Callable[[str], str]:
    """require(tool): the tool's path."""
    return _require
