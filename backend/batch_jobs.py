"""A batch's jobs (backend/batch.py): the manifest read into jobs, one job run on a warm Worker (in this process or
in a Ray actor, backend/batch_ray.py), its files published under fixed names, and the progress of the whole batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtex_contract import protocol, safe_remove

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
