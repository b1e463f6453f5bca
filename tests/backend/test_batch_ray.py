"""`python -m backend batch`: a manifest of tiny-model jobs, here and on a local Ray cluster (2 CPUs, 2 actors).

The Ray results must equal a sequential run's pixels bit for bit, survive an actor killed mid-batch, and a
second run must do no work. Bad lines fail alone, named by line and field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from backend.batch import DONE, FAILED, SKIPPED, Progress, read_manifest, run_batch

ray = pytest.importorskip("ray")


def write_manifest(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def manifest(tiny_model_dir: Path, tmp_path_factory) -> Path:
    base = {"task": "txt2img", "model": str(tiny_model_dir), "steps": 2, "width": 64, "height": 64}
    jobs = [base | {"prompt": f"stone wall {i}", "seed": 100 + i} for i in range(7)]
    jobs.append(base | {"prompt": "seed picked from the line"})  # reproducible without a seed
    return write_manifest(tmp_path_factory.mktemp("batch") / "jobs.jsonl", jobs)


@pytest.fixture(scope="module")
def sequential_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sequential")


@pytest.fixture(scope="module")
def sequential(manifest: Path, sequential_out: Path) -> dict[str, np.ndarray]:
    """The pixels of each job run one by one in this process (no Ray)."""
    outcomes = run_batch(manifest, sequential_out, threads=1, progress=Progress(8, None))
    assert [o.state for o in outcomes] == [DONE] * 8, outcomes
    return {o.key: pixels(o.files[0]) for o in outcomes}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pixels(path: str) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_ray_equals_sequential_survives_a_dead_actor_and_reruns_nothing(
    cluster, manifest: Path, sequential: dict, tmp_path: Path
):
    seen: dict = {}

    def kill_a_busy_actor(outcome) -> None:
        scheduler = seen["scheduler"]
        if "killed" not in seen and scheduler.in_flight:
            actor, job, _ = next(iter(scheduler.in_flight.values()))
            seen["killed"], seen["dead"] = job.key, f"actor {actor._actor_id.hex()[:8]}"
            ray.kill(actor, no_restart=True)

    progress = Progress(8, None, on_outcome=kill_a_busy_actor)
    outcomes = run_batch(
        manifest, tmp_path, ray_address="local", cpus_per_actor=1, progress=progress,
        on_start=lambda scheduler: seen.update(scheduler=scheduler, actors=len(scheduler.actors)),
    )  # fmt: skip
    assert seen["actors"] == 2
    assert [o.state for o in outcomes] == [DONE] * 8, [o.error for o in outcomes]
    retried = {o.key: o.attempts for o in outcomes if o.attempts > 1}
    assert retried == {seen["killed"]: 2} and seen["scheduler"].replaced == 1
    assert {o.key for o in outcomes} == set(sequential)
    for outcome in outcomes:
        assert np.array_equal(pixels(outcome.files[0]), sequential[outcome.key]), outcome.key
    assert seen["dead"] not in {o.worker for o in outcomes}  # the killed job was redone by another actor
    assert sum(o.loaded for o in outcomes) == len({o.worker for o in outcomes})  # one load per actor, then warm

    started = []
    again = run_batch(manifest, tmp_path, ray_address="local", progress=Progress(8, None), on_start=started.append)
    assert [o.state for o in again] == [SKIPPED] * 8 and not started
    assert [o.files for o in again] == [o.files for o in outcomes]


def test_a_damaged_result_is_redone(manifest: Path, sequential: dict, sequential_out: Path):
    first = run_batch(manifest, sequential_out, threads=1, progress=Progress(8, None))
    assert [o.state for o in first] == [SKIPPED] * 8
    Path(first[3].files[0]).write_bytes(b"not a png any more")
    second = run_batch(manifest, sequential_out, threads=1, progress=Progress(8, None))
    assert [o.state for o in second] == [SKIPPED] * 3 + [DONE] + [SKIPPED] * 4
    assert np.array_equal(pixels(second[3].files[0]), sequential[second[3].key])


def test_bad_lines_fail_alone(tiny_model_dir: Path, tmp_path: Path):
    good = {"task": "txt2img", "model": str(tiny_model_dir), "prompt": "moss", "steps": 2, "width": 64, "height": 64}
    manifest = write_manifest(
        tmp_path / "bad.jsonl",
        [
            '{"task": "txt2img", "prompt": ',
            {"task": "paint_it_all"},
            good | {"stpes": 3},
            good | {"steps": 0},
            {"task": "img2img", "model": str(tiny_model_dir), "prompt": "x", "image": {"path": "missing.png"}},
            good | {"model": str(tmp_path / "no-such-model")},
            good | {"seed": 5},
        ],
    )
    outcomes = run_batch(manifest, tmp_path / "out", threads=1, progress=Progress(7, None))
    assert [o.state for o in outcomes] == [FAILED] * 6 + [DONE]
    errors = [o.error for o in outcomes]
    assert errors[0].startswith("line 1: not valid JSON")
    assert errors[1].startswith("line 2, field task: 'paint_it_all' is not a task")
    assert errors[2].startswith("line 3, field stpes:")
    assert errors[3].startswith("line 4, field steps: steps must be an integer from 1 to 150")
    assert errors[4].startswith("line 5, field image: no such file") and "missing.png" in errors[4]
    assert outcomes[5].code == "model_not_found" and "no-such-model" in errors[5]
    assert [job.line for job in read_manifest(manifest, tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
