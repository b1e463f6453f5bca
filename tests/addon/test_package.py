"""The release zip: layout, manifest, reproducibility, and that it installs in Blender 5 (bpy 5.0.1) both
as an extension and as a legacy add-on, with a worker that runs from the installed copy.

Each install runs in its own Python process with its own user folders (BLENDER_USER_RESOURCES), and
without the editable install's import hook, so only the installed files can be imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from blender_sd_addon import installer
from blender_sd_addon.contract.protocol import PROTOCOL_VERSION

REPO = Path(__file__).resolve().parents[2]
ADDON = "blender_sd_addon"

# Runs in a fresh process: drop the editable install's finder, install the zip, report as JSON.
INSTALL_SCRIPT = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
import bpy  # first: it puts addon_utils on sys.path
import addon_utils
zip_path, how = sys.argv[1], sys.argv[2]
if how == "extension":
    outcome = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    module_name = "bl_ext.user_default.blender_sd_addon"
else:
    outcome = bpy.ops.preferences.addon_install(filepath=zip_path)
    module_name = "blender_sd_addon"
    addon_utils.enable(module_name, default_set=True)
module = sys.modules[module_name]
print("RESULT " + json.dumps({
    "outcome": sorted(outcome),
    "enabled": module_name in bpy.context.preferences.addons,
    "file": module.__file__,
    "generate": hasattr(bpy.ops.sdtex, "generate"),
    "install_backend": hasattr(bpy.ops.sdtex, "install_backend"),
    "command": sys.modules[module_name + ".paths"].worker_command(sys.executable),
}))
"""


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_addon", REPO / "build_addon.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_zip(out: Path) -> Path:
    done = subprocess.run(
        [sys.executable, str(REPO / "build_addon.py"), "--out", str(out)], capture_output=True, text=True, cwd=out
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


@pytest.fixture(scope="module")
def zip_path(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def install(zip_path: Path, how: str, home: Path) -> dict:
    pytest.importorskip("bpy")
    env = {**os.environ, "HOME": str(home), "BLENDER_USER_RESOURCES": str(home / "blender")}
    done = subprocess.run(
        [sys.executable, "-c", INSTALL_SCRIPT, str(zip_path), how], capture_output=True, text=True, cwd=home, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_zip_layout(zip_path, pyproject):
    names = zipfile.ZipFile(zip_path).namelist()
    assert zip_path.name == f"{ADDON}-{pyproject['project']['version']}.zip"
    assert all(name.startswith(f"{ADDON}/") for name in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/tests/" in n]
    for required in ("__init__.py", "blender_manifest.toml", "installer.py", "worker/backend/__main__.py"):
        assert f"{ADDON}/{required}" in names
    # Every source file of the backend, data included (the single-file configs load with no network).
    files = [p for p in (REPO / "backend").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    backend_files = {p.relative_to(REPO).as_posix() for p in files}
    assert backend_files == {n.removeprefix(f"{ADDON}/worker/") for n in names if "/worker/backend/" in n}
    assert f"{ADDON}/worker/backend/configs/sdxl/unet/config.json" in names

    # The locks Install Backend reads, per platform and Python, as `make lock` wrote them (torch is not in them).
    for lock in {name for by_python in installer.LOCKS.values() for name in by_python.values()}:
        assert zipfile.ZipFile(zip_path).read(f"{ADDON}/worker/locks/{lock}") == (REPO / "locks" / lock).read_bytes()
    assert not [n for n in names if n.endswith("requirements.txt")]


def test_a_missing_lock_stops_the_build(tmp_path):
    build_addon = load_build_script()
    shutil.copytree(REPO / "locks", tmp_path / "locks")
    shutil.copytree(REPO / ADDON, tmp_path / ADDON, ignore=shutil.ignore_patterns("__pycache__"))
    missing = installer.LOCKS["win32"]["3.10"]  # a lock only Blender 3.4-4.1's Python gets: still required
    (tmp_path / "locks" / missing).unlink()
    with pytest.raises(SystemExit, match=f"locks/{missing} missing.*make lock"):
        build_addon.zip_entries(tmp_path)


def test_build_is_reproducible(zip_path, tmp_path):
    assert build_zip(tmp_path).read_bytes() == zip_path.read_bytes()
    assert {info.date_time for info in zipfile.ZipFile(zip_path).infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_manifest_fields_and_versions(zip_path, pyproject):
    manifest = tomllib.loads(zipfile.ZipFile(zip_path).read(f"{ADDON}/blender_manifest.toml").decode())
    assert manifest["schema_version"] == "1.0.0"
    assert manifest["id"] == ADDON and manifest["type"] == "add-on" and manifest["name"] == "SD Textures"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert tuple(int(p) for p in manifest["blender_version_min"].split(".")) >= (4, 2, 0)
    assert manifest["maintainer"].strip()
    for text in (manifest["tagline"], *manifest["permissions"].values()):
        assert 0 < len(text) <= 64 and text[-1] not in ".!?,;:", text
    assert {"files", "network"} <= set(manifest["permissions"])

    import blender_sd_addon

    bl_info_version = ".".join(map(str, blender_sd_addon.bl_info["version"]))
    assert manifest["version"] == bl_info_version == pyproject["project"]["version"]


def test_blenders_own_validator_accepts_the_zip(zip_path):
    bpy_spec = importlib.util.find_spec("bpy")
    if bpy_spec is None:
        pytest.skip("bpy is not installed: Blender's extension validator comes with it")
    validators = sorted(Path(bpy_spec.origin).parent.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    assert validators, "bpy ships bl_pkg/cli/blender_ext.py"
    done = subprocess.run(
        [sys.executable, str(validators[-1]), "validate", str(zip_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout


def test_disagreeing_versions_stop_the_build(tmp_path):
    build_addon = load_build_script()
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in (ADDON, "backend"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    manifest = tmp_path / ADDON / "blender_manifest.toml"
    manifest.write_text(manifest.read_text().replace('\nversion = "', '\nversion = "9'))

    with pytest.raises(SystemExit, match="versions disagree.*blender_manifest.toml says 9"):
        build_addon.build(tmp_path / "dist", root=tmp_path)
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def check_worker_runs_from(installed: Path, command: list[str], cwd: Path) -> None:
    """The installed add-on starts its worker through its own launcher, and the worker answers a handshake."""
    assert command[1:] == [str(installed / "worker_launcher.py"), "serve"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    request = json.dumps({"id": "h", "method": "handshake", "params": {"protocol_version": PROTOCOL_VERSION}})
    shutdown = json.dumps({"id": "s", "method": "shutdown", "params": {}})
    done = subprocess.run(
        command, input=f"{request}\n{shutdown}\n", capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )  # fmt: skip
    replies = {m["id"]: m for m in map(json.loads, filter(str.strip, done.stdout.splitlines()))}
    assert replies["h"]["result"]["protocol_version"] == PROTOCOL_VERSION, done.stderr


def test_installs_as_extension_in_blender_5(zip_path, tmp_path):
    report = install(zip_path, "extension", tmp_path)
    installed = tmp_path / "blender/extensions/user_default" / ADDON
    assert report["outcome"] == ["FINISHED"] and report["enabled"]
    assert report["file"] == str(installed / "__init__.py")
    assert report["generate"] and report["install_backend"]
    check_worker_runs_from(installed, report["command"], tmp_path)


def test_installs_as_legacy_addon(zip_path, tmp_path):
    report = install(zip_path, "legacy", tmp_path)
    installed = tmp_path / "blender/scripts/addons" / ADDON
    assert report["outcome"] == ["FINISHED"] and report["enabled"]
    assert report["file"] == str(installed / "__init__.py")
    assert report["generate"] and report["install_backend"]
    assert all((installed / "worker/locks" / lock).is_file() for lock in installer.LOCKS[sys.platform].values())
