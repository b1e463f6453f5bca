"""The one way this project deletes a folder: only one it made itself, only under the parent it expects.

A folder is ours when it holds the marker file written the moment we created it (`make_dir`, `claim`).
`remove` refuses anything else: a path with `.` or `..` parts, a symbolic link (never followed), a folder
outside `parent` once links in the parent chain are resolved, the parent itself, a folder without our marker.
Both sides use it (stdlib only): the backend's batch, uploads and training folders, the installer's venvs.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

MARKER = ".sdtex-owned"
_WINDOWS_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
NAME_RULE = "a plain name: letters, digits, . _ - (not starting with a dot), no folders, at most 100 characters"


class RemovalRefused(OSError):
    """A folder was not removed because this project cannot prove it made it."""


def plain_name_problem(name: object) -> str:
    """Why `name` cannot name a file or folder of ours on any platform ("" when it can)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > 100 or not _NAME.match(name):
        return f"must be {NAME_RULE}"
    if name.endswith(".") or _WINDOWS_RESERVED.match(name):
        return "is reserved on Windows (CON, NUL, COM1, …, or ends with a dot)"
    return ""


def _mark(folder: Path) -> Path:
    (folder / MARKER).write_text("made by SD Textures; safe for it to delete\n", encoding="utf-8")
    return folder


def make_dir(prefix: str, parent: str | Path | None = None) -> Path:
    """A new, uniquely named folder of ours (like tempfile.mkdtemp; parent None: the temp folder)."""
    return _mark(Path(tempfile.mkdtemp(prefix=prefix, dir=parent)))


def claim(folder: str | Path) -> Path:
    """Create `folder` (it must not exist yet: an existing one may be somebody else's) and mark it ours."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir()
    return _mark(folder)


def claim_existing(folder: str | Path) -> Path:
    """Mark a folder that only this project can have made (the caller says why it knows) as ours."""
    return _mark(Path(folder))


def is_ours(folder: str | Path) -> bool:
    """`folder` is a real folder (not a link) holding our marker as a plain file."""
    folder = Path(folder)
    try:
        return stat.S_ISDIR(os.lstat(folder).st_mode) and stat.S_ISREG(os.lstat(folder / MARKER).st_mode)
    except OSError:
        return False


def check_removable(folder: str | Path, parent: str | Path) -> Path:
    """`folder` as it would be removed; RemovalRefused naming the reason when it must not be."""
    if ".." in re.split(r"[\\/]", os.fspath(folder)):
        raise RemovalRefused(f"not removing {folder}: the path has '..' parts")
    folder = Path(os.path.abspath(folder))  # 'x/.' becomes 'x' and then fails the parent check
    if folder.is_symlink():
        raise RemovalRefused(f"not removing {folder}: it is a symbolic link")
    real_parent = Path(os.path.realpath(parent))
    where = Path(os.path.realpath(folder.parent)) / folder.name
    if where == real_parent or real_parent not in where.parents:
        raise RemovalRefused(f"not removing {folder}: it is not inside {parent}")
    if not is_ours(folder):
        raise RemovalRefused(f"not removing {folder}: SD Textures did not make it (no {MARKER} file)")
    return where


def remove(folder: str | Path, parent: str | Path) -> bool:
    """Delete our `folder` under `parent` and everything in it; False when it is not there.

    RemovalRefused when it is there but not provably ours (see the module's rules); OSError when deleting fails."""
    if not os.path.lexists(folder):
        return False
    where = check_removable(folder, parent)
    shutil.rmtree(where)  # rmtree unlinks links inside the folder, never what they point to
    return True


def remove_quietly(folder: str | Path, parent: str | Path) -> bool:
    """`remove` for clean-up paths that must not fail the work they follow: refusals and errors are reported
    to stderr, never raised (what is not ours stays where it is)."""
    try:
        return remove(folder, parent)
    except OSError as exc:
        print(f"SD Textures: {exc}", file=sys.stderr)
        return False
