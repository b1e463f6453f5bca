"""The worker launcher: the worker's import path holds the backend and the contract, never the add-on nor Blender's
add-ons folder (where a sibling add-on's `numpy` folder would shadow the real one)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blender_sd_addon import paths
from blender_sd_addon.client import BackendClient
from blender_sd_addon.contract import protocol
from blender_sd_addon.worker_launcher import backend_root

REPO = Path(__file__).resolve().parents[2]
BROKEN_NUMPY = 'raise ImportError("a sibling add-on\'s numpy shadowed the real one")\n'
STUB_MAIN = """
import json, os, sys


def main(argv):
    import numpy, backend
    from sdtex_contract import protocol
    try:
        import blender_sd_addon
        addon = blender_sd_addon.__file__
    except ImportError:
        addon = None
    report = {"argv": argv, "path": sys.path, "numpy": numpy.__file__, "backend": backend.__file__,
              "addon": addon, "protocol": protocol.__file__,
              "env": [name for name in ("PYTHONPATH", "PYTHONHOME") if name in os.environ]}
    print(json.dumps(report))
    return 0
"""


def zip_layout(tmp_path: Path) -> Path:
    """An add-ons folder as Blender extracts the built zip into it, beside a sibling add-on's broken numpy."""
    spec = importlib.util.spec_from_file_location("build_addon", REPO / "build_addon.py")
    build_addon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_addon)
    addons = tmp_path / "addons"
    for name, content in build_addon.zip_entries(REPO).items():
        (addons / name).parent.mkdir(parents=True, exist_ok=True)
        (addons / name).write_bytes(content)
    (addons / "numpy").mkdir()
    (addons / "numpy" / "__init__.py").write_text(BROKEN_NUMPY)
    return addons / "blender_sd_addon"


def test_the_launcher_keeps_the_addons_folder_off_the_import_path(tmp_path):
    addon_dir = zip_layout(tmp_path)
    addons = addon_dir.parent
    shutil.rmtree(addon_dir / "worker" / "backend")  # a stub backend reports what the worker would see
    (addon_dir / "worker" / "backend").mkdir()
    (addon_dir / "worker" / "backend" / "__init__.py").write_text("")
    (addon_dir / "worker" / "backend" / "__main__.py").write_text(STUB_MAIN)
    env = {**os.environ, "PYTHONPATH": str(addons)}  # what the old client passed: the trap itself
    old_way = subprocess.run([sys.executable, "-c", "import numpy"], env=env, capture_output=True, text=True)
    assert "shadowed the real one" in old_way.stderr

    done = subprocess.run(
        paths.worker_command(sys.executable, addon_dir), env=env, cwd=addons, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["argv"] == ["serve"] and report["env"] == []
    assert report["path"][0] == str(addon_dir / "worker")
    assert not {str(addons), str(addon_dir), ""} & set(report["path"])
    assert not report["numpy"].startswith(str(addons))
    assert report["backend"] == str(addon_dir / "worker" / "backend" / "__init__.py")
    # the worker needs nothing of the add-on (tests/test_architecture.py); the launcher registers none of it
    assert not (report["addon"] or "").startswith(str(addons))  # (this venv's editable install may show the checkout's)
    assert report["protocol"] == str(addon_dir / "worker" / "sdtex_contract" / "protocol.py")


def test_backend_root_prefers_the_bundled_worker(tmp_path):
    addon_dir = tmp_path / "blender_sd_addon"
    addon_dir.mkdir()
    assert backend_root(addon_dir) is None
    for package in ("backend", "sdtex_contract"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        assert backend_root(addon_dir) == (tmp_path if package == "sdtex_contract" else None)  # both are needed
    for package in ("backend", "sdtex_contract"):
        (addon_dir / "worker" / package).mkdir(parents=True)
        (addon_dir / "worker" / package / "__init__.py").write_text("")
    assert backend_root(addon_dir) == addon_dir / "worker"
    assert backend_root(paths.ADDON_DIR) == REPO


@pytest.mark.parametrize("layout", ["installed zip", "source checkout"])
def test_the_real_worker_handshakes_through_the_launcher(layout, tmp_path, monkeypatch):
    addon_dir = zip_layout(tmp_path) if layout == "installed zip" else paths.ADDON_DIR
    monkeypatch.setenv("PYTHONPATH", str(addon_dir.parent))  # dropped by the client and the launcher
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = BackendClient(paths.worker_command(sys.executable, addon_dir), log_path=tmp_path / "backend.log")
    try:
        shake = client.start(timeout=120)
        assert shake.protocol_version == protocol.PROTOCOL_VERSION
        assert set(protocol.TASKS) <= set(shake.tasks)
    finally:
        client.shutdown()
    assert "shadowed" not in (tmp_path / "backend.log").read_text()
