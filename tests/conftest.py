"""Shared fixtures: a tiny seeded random model (built once) and the real worker as a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
from worker_process import WorkerProcess


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionPipeline folder (random weights, seed 0), built offline once per session."""
    from backend.tiny_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def worker():
    """A running worker shared by one test module."""
    process = WorkerProcess()
    yield process
    process.close()
