"""Build the add-on zip that installs in Blender 3.4 to 5.x.

    python build_addon.py [--out dist]      ->  dist/blender_sd_addon-<version>.zip

Layout (one top folder, the add-on package itself):

    blender_sd_addon/__init__.py ...          the add-on (bl_info for Blender 3.4-4.1)
    blender_sd_addon/blender_manifest.toml    the extension manifest (Blender 4.2+)
    blender_sd_addon/contract/...             the contract (sdtex_contract), vendored: the add-on imports it from here
    blender_sd_addon/worker/backend/...       the backend package, run by the backend's own Python
    blender_sd_addon/worker/sdtex_contract/...  the same contract, for the worker
    blender_sd_addon/worker/locks/backend-<platform>[-py310].txt   its dependencies: the locks Install Backend uses

Why one zip works for both: Blender 4.2+ accepts an extension zip whose manifest sits in a single top
folder (`pkg_zipfile_detect_subdir_or_none` in bl_pkg/cli/blender_ext.py) and installs that folder's
contents as the extension; Blender 3.4-4.1 (Install add-on from file, `preferences.addon_install`)
extract the zip into scripts/addons/ and find the `blender_sd_addon` package by its bl_info. With the
manifest at the zip root instead, the legacy path would get loose files and no package.

The zip is reproducible: sorted entries, fixed timestamps and permissions. The build fails when the
versions in bl_info, the manifest, pyproject.toml and backend/__init__.py disagree.
Needs Python 3.11+ (tomllib).
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent
ADDON = "blender_sd_addon"
MANIFEST = "blender_manifest.toml"
CONTRACT = "sdtex_contract"  # the package both sides import, vendored twice: for the add-on and for the worker
VENDORED = "contract"  # its folder in the add-on (a link to ../sdtex_contract in a checkout)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = {".pyc", ".pyo"}


def _assigned_literal(path: Path, name: str):
    """The literal assigned to `name` at the top level of a Python file (read without importing it)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"error: {path} assigns no {name}")


def read_versions(root: Path = ROOT) -> dict[str, str]:
    """The version written in each place that states one."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    manifest = tomllib.loads((root / ADDON / MANIFEST).read_text(encoding="utf-8"))
    return {
        "bl_info": ".".join(
            str(part) for part in _assigned_literal(root / ADDON / "__init__.py", "bl_info")["version"]
        ),
        MANIFEST: manifest["version"],
        "pyproject.toml": pyproject["project"]["version"],
        "backend/__init__.py": _assigned_literal(root / "backend" / "__init__.py", "__version__"),
    }


def agreed_version(versions: dict[str, str]) -> str:
    if len(set(versions.values())) != 1:
        listed = ", ".join(f"{place} says {version}" for place, version in versions.items())
        raise SystemExit(f"error: the versions disagree ({listed}); make them equal before building")
    return next(iter(versions.values()))


def locks(root: Path = ROOT) -> dict[str, bytes]:
    """The locks the installer reads (installer_choice.LOCKS), by file name: exact versions with hashes, torch
    left out."""
    by_platform = _assigned_literal(root / ADDON / "installer_choice.py", "LOCKS").values()
    names = sorted({name for by_python in by_platform for name in by_python.values()})
    missing = [name for name in names if not (root / "locks" / name).is_file()]
    if missing:
        raise SystemExit(f"error: locks/{', locks/'.join(missing)} missing in {root}: run `make lock`")
    return {name: (root / "locks" / name).read_bytes() for name in names}


def _source_files(folder: Path):
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if path.is_file() and not SKIPPED_DIRS.intersection(parts) and path.suffix not in SKIPPED_SUFFIXES:
            if not any(part.startswith(".") for part in parts):
                yield path


def zip_entries(root: Path = ROOT) -> dict[str, bytes]:
    """Archive name -> content, for everything the zip holds."""
    addon = root / ADDON
    entries = {
        f"{ADDON}/{p.relative_to(addon).as_posix()}": p.read_bytes()
        for p in _source_files(addon)
        if p.relative_to(addon).parts[0] != VENDORED  # the checkout's link: its files are vendored below
    }
    for folder, place in (
        (root / "backend", "worker/backend"),
        (root / CONTRACT, VENDORED),
        (root / CONTRACT, f"worker/{CONTRACT}"),
    ):
        entries.update(
            {f"{ADDON}/{place}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in _source_files(folder)}
        )
    entries.update({f"{ADDON}/worker/locks/{name}": content for name, content in locks(root).items()})
    return entries


def build(out_dir: Path, root: Path = ROOT) -> Path:
    version = agreed_version(read_versions(root))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{ADDON}-{version}.zip"
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in sorted(zip_entries(root).items()):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, content)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
