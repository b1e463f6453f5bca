"""Shared fixtures: tiny seeded random models (SD and SDXL, built once) and the real worker as a subprocess.

The whole run, and every worker and Blender it starts, uses a private temp folder (TMPDIR): a test that deletes
the wrong folder, or fills one, only ever reaches what this run made."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from worker_process import WorkerProcess

from sdtex_contract import safe_remove

_system_temp = tempfile.gettempdir()


def pytest_configure(config: pytest.Config) -> None:
    private = safe_remove.make_dir("sdtex-tests-", _system_temp)
    os.environ["TMPDIR"] = tempfile.tempdir = str(private)


def pytest_unconfigure(config: pytest.Config) -> None:
    safe_remove.remove_quietly(tempfile.gettempdir(), _system_temp)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionPipeline folder (random weights, seed 0), built offline once per session."""
    from backend.tiny_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionXLPipeline folder (random weights, seed 0; its VAE has latents mean/std)."""
    from backend.tiny_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-sdxl-model") / "tiny-sdxl", seed=0, architecture="tiny-sdxl")


@pytest.fixture(scope="module")
def worker():
    """A running worker shared by one test module."""
    process = WorkerProcess()
    yield process
    process.close()


@pytest.fixture
def run_params(tiny_model_dir: Path, tmp_path: Path) -> dict:
    """A small valid txt2img `run` request on the tiny model, writing into this test's own folder."""
    return {
        "task": "txt2img",
        "model": str(tiny_model_dir),
        "prompt": "weathered oak planks",
        "steps": 2,
        "width": 64,
        "height": 64,
        "output_dir": str(tmp_path / "out"),
    }
