"""The locks (locks/, written by `make lock`): every dependency pinned inside pyproject.toml's range with hashes,
torch left to the installer, the backend's locks on the versions the dev lock tests (on Python 3.10 those or
older ones), the known breaks kept out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from blender_sd_addon import installer

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
BACKEND_LOCKS = sorted({name for by_python in installer.LOCKS.values() for name in by_python.values()})
PY310_LOCKS = {system: by_python["3.10"] for system, by_python in installer.LOCKS.items()}
TESTED_LOCKS = {system: by_python["3.11"] for system, by_python in installer.LOCKS.items()}  # the suite's Python
PIN = re.compile(r"^([a-z0-9._-]+)==(\S+)", re.M)
HASHED = re.compile(r"^([a-z0-9._-]+)==\S+ \\\n    --hash=sha256:[0-9a-f]{64}", re.M)  # a pin, then its hashes


def pins(name: str) -> dict[str, Version]:
    """Package -> pinned version; fails on any pin without a hash (pip's --require-hashes would refuse it)."""
    text = (LOCKS / name).read_text()
    found = {canonicalize_name(match[1]): Version(match[2]) for match in PIN.finditer(text)}
    assert found and set(found) == {canonicalize_name(match[1]) for match in HASHED.finditer(text)}, name
    return found


def requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [Requirement(text) for text in listed]


@pytest.mark.parametrize("lock", [*BACKEND_LOCKS, "dev-linux.txt"])
def test_every_dependency_is_pinned_inside_its_range_and_torch_is_left_out(lock):
    pinned = pins(lock)
    wanted = requirements() + (requirements("dev") if lock.startswith("dev") else [])
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pinned, f"{lock} lacks {requirement}: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{lock}: {name} {pinned[name]}"
    # torch and what only a torch build brings come with the build the installer chooses
    assert not [name for name in pinned if name in ("torch", "triton", "sympy") or name.startswith("nvidia-")]


@pytest.mark.parametrize("lock", sorted(TESTED_LOCKS.values()))
def test_users_get_the_versions_the_tests_ran(lock):
    tested = pins("dev-linux.txt")  # a package only one platform needs (colorama on Windows) is not in it
    assert {name: version for name, version in pins(lock).items() if tested.get(name, version) != version} == {}


@pytest.mark.parametrize("lock", [*BACKEND_LOCKS, "dev-linux.txt"])
def test_known_breaks_are_kept_out(lock):
    pinned = pins(lock)
    lines = (LOCKS / "constraints.txt").read_text().splitlines()
    constraints = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert constraints, "locks/constraints.txt lists no constraint"
    for constraint in constraints:
        version = pinned.get(canonicalize_name(constraint.name))
        assert version is None or constraint.specifier.contains(version), f"{lock}: {constraint.name} {version}"


@pytest.mark.parametrize("system", sorted(PY310_LOCKS))
def test_python_310_gets_the_tested_versions_or_older(system):
    """Resolved from the 3.11 lock's versions (`make lock`), not tested here: older only where those need 3.11."""
    tested, older = pins(TESTED_LOCKS[system]), pins(PY310_LOCKS[system])
    assert older["numpy"] == tested["numpy"] and older != tested
    assert {name: version for name, version in older.items() if tested.get(name, version) < version} == {}


def test_the_lock_is_checked_for_every_python_the_installer_accepts():
    makefile = (REPO / "Makefile").read_text()
    kinds = ("", "PY310_")  # LOCK_PYTHONS: the main locks'; PY310_LOCK_PYTHONS: the 3.10 locks'
    checked = {kind: re.search(rf"^{kind}LOCK_PYTHONS := ([\d. ]+)", makefile, re.M)[1].split() for kind in kinds}
    low, high = installer.SUPPORTED_PYTHON
    supported = [f"3.{minor}" for minor in range(low[1], high[1] + 1)]
    assert sorted(checked[""] + checked["PY310_"]) == supported and low[0] == high[0] == 3 and low <= (3, 10)
    for system, by_python in installer.LOCKS.items():  # the lock for each Python is the one checked there
        assert sorted(by_python) == supported, system
        assert {by_python[python] for python in checked[""]} == {TESTED_LOCKS[system]}
        assert {by_python[python] for python in checked["PY310_"]} == {PY310_LOCKS[system]} != {TESTED_LOCKS[system]}
