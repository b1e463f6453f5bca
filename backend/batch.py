"""`python -m backend batch MANIFEST [--ray ADDRESS]`: many jobs, locally or spread over a Ray cluster.

The manifest is JSON lines, one job per line: `{"task": "txt2img", "model": ..., "prompt": ..., ...}` with any
task's parameters (protocol.TASK_PARAMS) and an optional `"id"`. Every job runs through the same Worker as
the add-on's jobs, so its results are what the add-on or the CLI would make from the same parameters.

Reproducible and restartable:
- A job's key is its `id`, else `<task>-<hash of its parameters>`; its files go to `OUT/<key>/` named
  `<key>_<index>_<role>.png`, and `OUT/<key>/result.json` is written last. A re-run skips every job whose
  result.json lists files that are all there with their sha256: it does no work for finished jobs.
- A job without a seed gets one derived from its parameters, so every image can be made again bit for bit.
- Inputs (image and array paths, relative to the manifest) are read here and sent as bytes, so the workers
  need no shared disk; results come back as bytes and are written here.

Bad lines fail alone, each with its line and field named: malformed JSON, an unknown task or field, a value
out of range, a missing input file; a job whose model is not on a node fails with the worker's error.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from backend.batch_jobs import (
    DONE,
    FAILED,
    RESULT_FILE,
    SKIPPED,
    BatchJob,
    JobRunner,
    Outcome,
    Progress,
    complete,
    job_inputs,
    publish,
    read_manifest,
)
from sdtex_contract import protocol

__all__ = ["DONE", "FAILED", "SKIPPED", "Progress", "read_manifest", "run_batch"]  # what callers use of a batch


def by_model(jobs: Iterable[BatchJob]) -> list[BatchJob]:
    """Jobs of one model together (in the order their models first appear), so weights load once."""
    groups: dict[str, list[BatchJob]] = defaultdict(list)
    for job in jobs:
        groups[job.model].append(job)
    return [job for group in groups.values() for job in group]


def run_local(jobs: list[BatchJob], out: Path, progress: Progress, threads: int = 0) -> list[Outcome]:
    import torch

    before = torch.get_num_threads()
    runner = JobRunner(threads)
    outcomes = []
    try:
        for job in by_model(jobs):
            job.attempts += 1
            start = time.perf_counter()
            reply = runner.run(job.key, job.params, job_inputs(job))
            outcomes.append(publish(job, reply, out, time.perf_counter() - start))
            progress(outcomes[-1])
    finally:
        torch.set_num_threads(before)  # this process goes on with its own setting
        runner.close()
    return outcomes


def run_batch(
    manifest: Path,
    out: Path,
    *,
    ray_address: str | None = None,
    actors: int = 0,
    cpus_per_actor: int = 1,
    threads: int = 0,
    progress: Progress | None = None,
    on_start: Callable[[Any], None] | None = None,
) -> list[Outcome]:
    """Run the manifest's jobs; outcomes in manifest order. Skips complete jobs; bad lines fail alone.

    ray_address: None runs here, in this process; "local" starts a Ray cluster on this machine; else the
    address of a running one ("auto", "ray://head:10001"). actors: how many (0: one per GPU, else one per
    `cpus_per_actor` CPUs). threads: torch threads per worker (0: torch's default).
    on_start: called with the Ray scheduler before the first job (tests use it to kill actors).
    """
    out = Path(out).resolve()
    jobs = read_manifest(manifest, out)
    progress = progress or Progress(len(jobs))
    outcomes: dict[str, Outcome] = {}
    todo: list[BatchJob] = []
    for job in jobs:
        if job.error:
            outcomes[job.key] = Outcome(job.key, job.line, FAILED, job.error, protocol.INVALID_PARAMS)
        elif complete(job, out):
            outcomes[job.key] = Outcome(job.key, job.line, SKIPPED, files=_listed(job, out))
        else:
            todo.append(job)
            continue
        progress(outcomes[job.key])
    if todo:
        if ray_address is None:
            ran = run_local(todo, out, progress, threads)
        else:
            from backend.batch_ray import run_on_ray

            ran = run_on_ray(todo, out, progress, ray_address, actors, cpus_per_actor, threads, on_start)
        outcomes.update((outcome.key, outcome) for outcome in ran)
    return [outcomes[job.key] for job in jobs]


def _listed(job: BatchJob, out: Path) -> list[str]:
    return [str(out / job.key / name) for name in json.loads((out / job.key / RESULT_FILE).read_text())["files"]]


def main(args) -> int:
    out = args.out or Path(args.manifest).with_suffix("").with_name(Path(args.manifest).stem + "-outputs")
    outcomes = run_batch(
        args.manifest, out, ray_address=args.ray, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        threads=args.threads,
    )  # fmt: skip
    report = Path(out) / "batch-report.jsonl"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("".join(json.dumps(asdict(outcome)) + "\n" for outcome in outcomes))
    counts = {state: sum(o.state == state for o in outcomes) for state in (DONE, SKIPPED, FAILED)}
    print(f"{counts[DONE]} done, {counts[SKIPPED]} skipped (complete), {counts[FAILED]} failed; report: {report}")
    return 1 if counts[FAILED] else 0


def add_arguments(parser) -> None:
    parser.add_argument("manifest", type=Path, help="JSON lines, one job per line: {\"task\": ..., params}.")
    parser.add_argument("--out", type=Path, help="Output folder (default: <manifest>-outputs next to it).")
    parser.add_argument("--ray", metavar="ADDRESS", help="Run on Ray: a cluster address, 'auto', or 'local'.")
    parser.add_argument("--actors", type=int, default=0, help="Ray actors (default: one per GPU, else per CPUs).")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs per actor on a cluster without GPUs.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default).")
