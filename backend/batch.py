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

import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blender_sd_addon import protocol, safe_remove

RESULT_FILE = "result.json"
MAX_ATTEMPTS = 3  # a job whose worker died is tried again on another, at most this often in all
DONE, FAILED, SKIPPED = "done", "failed", "skipped"


@dataclass
class BatchJob:
    line: int  # 1-based line of the manifest
    key: str  # names the job's folder and files
    params: dict  # validated run params, seed fixed, inputs as {"sha256": ...}; output_dir set by the runner
    inputs: dict[str, str] = field(default_factory=dict)  # sha256 -> file to send
    error: str = ""  # the manifest line's problem: reported failed, never run
    attempts: int = 0

    @property
    def model(self) -> str:
        return self.params.get("model", "") or ""


@dataclass
class Outcome:
    key: str
    line: int
    state: str  # done | failed | skipped
    error: str = ""
    code: str = ""
    files: list[str] = field(default_factory=list)
    attempts: int = 0
    worker: str = ""  # which worker ran it (pid, or Ray actor)
    loaded: bool = False  # the worker loaded the model for this job (else it was warm)
    seconds: float = 0.0


# --- the manifest ---------------------------------------------------------------------------------------------


def read_manifest(path: Path, out: Path) -> list[BatchJob]:
    """Every line as a job; a bad line becomes a job with `error` (its line and field named)."""
    jobs: list[BatchJob] = []
    keys: set[str] = set()
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        job = parse_line(text, number, Path(path).parent)
        base = job.key
        for n in range(2, 10_000):  # identical lines would share a key: number the later ones
            if job.key not in keys:
                break
            job.key = f"{base}-{n}"
        keys.add(job.key)
        jobs.append(job)
    return jobs


def parse_line(text: str, line: int, base: Path) -> BatchJob:
    failed = BatchJob(line, f"line-{line}", {})
    try:
        entry = protocol.decode(text)
    except protocol.ProtocolError as exc:
        failed.error = f"line {line}: {exc.message}"
        return failed
    task = entry.get("task")
    if task not in protocol.TASK_PARAMS:
        tasks = ", ".join(protocol.TASKS)
        failed.error = f"line {line}, field task: {protocol.shown(task)} is not a task; tasks: {tasks}"
        return failed
    job_id = entry.pop("id", None)
    if job_id is not None and (problem := safe_remove.plain_name_problem(job_id)):
        failed.error = f"line {line}, field id: {problem}; got {protocol.shown(job_id)}"  # it names OUT/<id>/
        return failed
    table = {p.name: p for p in protocol.TASK_PARAMS[task]}
    unknown = sorted(set(entry) - set(table))
    if unknown:
        failed.error = f"line {line}, field {unknown[0]}: {task} has no such parameter"
        return failed
    if "output_dir" in entry:
        failed.error = f"line {line}, field output_dir: leave it out; files go to OUT/<job>/ (--out)"
        return failed
    inputs: dict[str, str] = {}
    for name, p in table.items():
        value = entry.get(name)
        if p.kind in (protocol.ImageInput, protocol.ArrayInput) and isinstance(value, dict) and "path" in value:
            file = (base / os.path.expanduser(value["path"])).resolve()
            if not file.is_file():
                failed.error = f"line {line}, field {name}: no such file: {file}"
                return failed
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            inputs[digest] = str(file)
            entry[name] = {k: v for k, v in value.items() if k != "path"} | {"sha256": digest}
    model = entry.get("model")
    if isinstance(model, str) and model and (base / model).exists():
        entry["model"] = str((base / model).resolve())  # a folder or file next to the manifest
    try:
        params = protocol.task_params(entry | {"output_dir": "/batch"}).to_dict()
    except protocol.ProtocolError as exc:
        failed.error = f"line {line}, field {exc.data.get('param', 'task')}: {exc.message}"
        return failed
    del params["output_dir"]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    if "seed" in params and params["seed"] is None:
        params["seed"] = int(digest[:8], 16)  # reproducible: the same line always gets the same seed
    key = job_id or f"{task}-{digest[:12]}"
    return BatchJob(line, key, params, inputs)


def complete(job: BatchJob, out: Path) -> bool:
    """The job's result.json is there and every file it lists is there with its sha256."""
    try:
        record = json.loads((out / job.key / RESULT_FILE).read_text())
        return all(
            hashlib.sha256((out / job.key / name).read_bytes()).hexdigest() == digest
            for name, digest in record["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# --- running one job (in this process, or inside a Ray actor) ---------------------------------------------------


class JobRunner:
    """A warm Worker that runs batch jobs one at a time and hands back their files as bytes."""

    def __init__(self, threads: int = 0):
        import torch

        from backend.worker import Worker, quiet_libraries

        if threads:
            torch.set_num_threads(threads)  # results may differ in the last float bit between thread counts
        quiet_libraries()
        self._replies: list[dict] = []
        self.worker = Worker(self._replies.append)
        self.folder = safe_remove.make_dir("sdtex-batch-")
        self.name = f"pid {os.getpid()}"

    def run(self, key: str, params: dict, inputs: dict[str, bytes]) -> dict:
        """{"ok", "result" | "error", "files": [(artifact, bytes)], "worker"}."""
        for data in inputs.values():
            self.worker.inputs.put(data)
        folder = safe_remove.claim(self.folder / key)
        self._replies.clear()
        self.worker.handle(protocol.request(key, protocol.RUN, params | {"output_dir": str(folder)}))
        reply = next(m for m in reversed(self._replies) if protocol.is_terminal(m))
        try:
            if "error" in reply:
                return {"ok": False, "error": reply["error"], "worker": self.name}
            artifacts = reply["result"].get("artifacts", [])
            files = [(artifact, Path(artifact["path"]).read_bytes()) for artifact in artifacts]
            return {"ok": True, "result": reply["result"], "files": files, "worker": self.name}
        finally:
            safe_remove.remove_quietly(folder, self.folder)

    def close(self) -> None:
        self.worker.inputs.close()
        safe_remove.remove_quietly(self.folder, self.folder.parent)


def job_inputs(job: BatchJob) -> dict[str, bytes]:
    return {digest: Path(path).read_bytes() for digest, path in job.inputs.items()}


def publish(job: BatchJob, reply: dict, out: Path, seconds: float) -> Outcome:
    """Write a job's files under their fixed names, then result.json (last: it marks the job complete)."""
    if not reply["ok"]:
        error = reply["error"]
        return Outcome(job.key, job.line, FAILED, error["message"], error["code"], attempts=job.attempts,
                       worker=reply["worker"], seconds=seconds)  # fmt: skip
    folder = out / job.key
    try:
        safe_remove.remove(folder, out)  # an earlier, unfinished attempt's files
        safe_remove.claim(folder)
    except OSError as exc:  # e.g. a folder of that name that this batch did not make: left as it is
        return Outcome(job.key, job.line, FAILED, f"cannot write the job's folder: {exc}", protocol.OUTPUT_FAILED,
                       attempts=job.attempts, worker=reply["worker"], seconds=seconds)  # fmt: skip
    names: dict[str, str] = {}  # worker path -> name here
    digests: dict[str, str] = {}
    for artifact, data in reply["files"]:
        name = f"{job.key}_{artifact.get('index', 0)}_{artifact.get('role') or artifact.get('kind', 'file')}"
        name += Path(artifact["path"]).suffix
        (folder / name).write_bytes(data)
        names[artifact["path"]], digests[name] = name, hashlib.sha256(data).hexdigest()
    result = _renamed(reply["result"], {path: str(folder / name) for path, name in names.items()})
    record = {"line": job.line, "params": job.params, "files": digests, "result": result}
    temporary = folder / f".{RESULT_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, folder / RESULT_FILE)
    loaded = bool(result.get("timings", {}).get("load"))
    return Outcome(job.key, job.line, DONE, files=[str(folder / name) for name in digests], attempts=job.attempts,
                   worker=reply["worker"], loaded=loaded, seconds=seconds)  # fmt: skip


def _renamed(value: Any, paths: dict[str, str]) -> Any:
    """The result with every worker path replaced by the file's path here."""
    if isinstance(value, dict):
        return {k: _renamed(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, paths) for v in value]
    return paths.get(value, value) if isinstance(value, str) else value


# --- the batch ------------------------------------------------------------------------------------------------


class Progress:
    """Counts jobs done, failed and left; draws a bar on stderr (or reports to a callback)."""

    def __init__(self, total: int, stream=sys.stderr, on_outcome: Callable[[Outcome], None] | None = None):
        self.total, self.stream, self.on_outcome = total, stream, on_outcome
        self.done = self.failed = 0

    def __call__(self, outcome: Outcome) -> None:
        if outcome.state == FAILED:
            self.failed += 1
            print(f"\nfailed: {outcome.key} (line {outcome.line}): {outcome.error}", file=self.stream)
        else:
            self.done += 1
        if self.stream:
            finished = self.done + self.failed
            bar = "#" * (30 * finished // max(1, self.total))
            left = self.total - finished
            print(f"\r[{bar:<30}] done {self.done}  failed {self.failed}  left {left}", end="", file=self.stream)
            if not left:
                print(file=self.stream)
        if self.on_outcome:
            self.on_outcome(outcome)


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
