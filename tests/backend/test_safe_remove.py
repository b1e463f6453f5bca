"""Never delete what we did not make: the one guarded remove helper, and the batch ids that once named `..`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from backend.batch import DONE, FAILED, Progress, run_batch
from sdtex_contract import safe_remove
from sdtex_contract.safe_remove import RemovalRefused


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR inside this test's own folder: whatever a bug deletes there is this test's alone."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_removes_a_folder_it_made_with_everything_in_it(private_tmp: Path):
    folder = safe_remove.make_dir("sdtex-test-")
    (folder / "sub").mkdir()
    (folder / "sub" / "file.txt").write_text("x")
    assert folder.parent == private_tmp
    assert safe_remove.remove(folder, private_tmp) is True
    assert not folder.exists() and private_tmp.is_dir()
    assert safe_remove.remove(folder, private_tmp) is False  # gone already: nothing to do


def test_refuses_a_folder_without_the_marker(tmp_path: Path):
    theirs = tmp_path / "someone-elses"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("keep me")
    with pytest.raises(RemovalRefused, match="did not make it"):
        safe_remove.remove(theirs, tmp_path)
    assert (theirs / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("relative", ["..", "x/..", "x/../..", "."])
def test_refuses_dot_paths_and_the_parent_itself(tmp_path: Path, relative: str):
    parent = tmp_path / "parent"
    safe_remove.claim(parent / "x")
    safe_remove.claim_existing(parent)  # even a marked parent must not go through a dotted child path
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    with pytest.raises(RemovalRefused):
        safe_remove.remove(f"{parent}/{relative}", parent)
    assert canary.read_text() == "alive" and (parent / "x").is_dir()


def test_refuses_a_folder_outside_the_parent(tmp_path: Path):
    outside = safe_remove.claim(tmp_path / "elsewhere")
    (tmp_path / "parent").mkdir()
    with pytest.raises(RemovalRefused, match="not inside"):
        safe_remove.remove(outside, tmp_path / "parent")
    assert outside.is_dir()


def test_never_follows_a_symbolic_link(tmp_path: Path):
    target = safe_remove.claim(tmp_path / "target")  # ours, but reached through a link: still refused
    (target / "inside.txt").write_text("x")
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "link").symlink_to(target, target_is_directory=True)
    with pytest.raises(RemovalRefused, match="symbolic link"):
        safe_remove.remove(parent / "link", parent)
    assert (target / "inside.txt").exists()


def test_a_link_inside_our_folder_is_removed_not_its_target(tmp_path: Path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("keep me")
    ours = safe_remove.claim(tmp_path / "parent" / "ours")
    (ours / "link").symlink_to(theirs, target_is_directory=True)
    assert safe_remove.remove(ours, tmp_path / "parent")
    assert (theirs / "precious.txt").read_text() == "keep me"


def test_a_parent_reached_through_a_link_still_counts(tmp_path: Path):
    real = tmp_path / "real"
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    folder = safe_remove.claim(real / "job")
    assert safe_remove.remove(tmp_path / "alias" / "job", real)
    assert not folder.exists()


@pytest.mark.parametrize(
    "name", [".", "..", "/x", "a/../..", "a/b", "a\\b", "C:x", ".hidden", "CON", "nul.txt", "COM1", "x.", "", "a" * 101]
)
def test_plain_names_refuse_what_could_leave_a_folder(name: str):
    assert safe_remove.plain_name_problem(name)


@pytest.mark.parametrize("name", ["oak", "oak-planks_2", "v1.2", "CONSOLE", "a" * 100])
def test_plain_names_accept_ordinary_ids(name: str):
    assert safe_remove.plain_name_problem(name) == ""


def test_batch_refuses_ids_that_are_not_plain_names_and_deletes_nothing(private_tmp: Path, tmp_path: Path):
    """Today's main deleted TMPDIR (id '..') and the manifest's folder, or every earlier result (id '.')."""
    PIL.Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "img.png")
    out = tmp_path / "out"
    (out / "earlier-job").mkdir(parents=True)
    (out / "earlier-job" / "result.png").write_bytes(b"an earlier job's result")
    canaries = [private_tmp / "canary.txt", tmp_path / "canary.txt"]  # in the temp folder, beside OUT
    for canary in canaries:
        canary.write_text("alive")
    bad_ids = [".", "..", "/x", "a/../.."]
    lines = [{"task": "pbr", "image": {"path": "img.png"}, "id": job_id} for job_id in [*bad_ids, "fine"]]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))

    outcomes = run_batch(manifest, out, threads=1, progress=Progress(len(lines), None))

    assert [o.state for o in outcomes] == [FAILED] * 4 + [DONE]
    for number, outcome in enumerate(outcomes[:4], start=1):
        assert outcome.error.startswith(f"line {number}, field id: must be a plain name"), outcome.error
    assert all(canary.read_text() == "alive" for canary in canaries)
    assert (out / "earlier-job" / "result.png").read_bytes() == b"an earlier job's result"
    assert (out / "fine" / "fine_0_height.png").is_file()
    assert [name for name in os.listdir(private_tmp) if name.startswith("sdtex-")] == []  # ours, cleaned up


def test_batch_leaves_a_folder_it_did_not_make_alone(private_tmp: Path, tmp_path: Path):
    PIL.Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "img.png")
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "notes.txt").write_text("the artist's own folder")
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"task": "pbr", "image": {"path": "img.png"}, "id": "mine"}) + "\n")

    [outcome] = run_batch(manifest, out, threads=1, progress=Progress(1, None))

    assert outcome.state == FAILED and outcome.code == "output_failed"
    assert "did not make it" in outcome.error and "mine" in outcome.error
    assert (out / "mine" / "notes.txt").read_text() == "the artist's own folder"
