"""Batch jobs on Ray: one actor per GPU (or per N CPUs), each a warm JobRunner; jobs go to actors by model.

The driver keeps one job in flight per actor. A free actor takes the next job of the model it ran last (its
weights are warm), else one of the model with the most jobs left. A job whose actor died (killed, out of
memory, node lost) is queued again and the actor replaced; it fails after MAX_ATTEMPTS.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from backend.batch_jobs import FAILED, MAX_ATTEMPTS, BatchJob, JobRunner, Outcome, Progress, job_inputs, publish


@ray.remote
class BatchActor:
    """A JobRunner in its own process, on its own GPU (or CPUs)."""

    def __init__(self, threads: int):
        self.runner = JobRunner(threads)
        self.runner.name = f"actor {ray.get_runtime_context().get_actor_id()[:8]}"

    def run(self, key: str, params: dict, inputs: dict[str, bytes]) -> dict:
        return self.runner.run(key, params, inputs)

    def close(self) -> None:
        self.runner.close()


class Scheduler:
    """The driver's view: actors, the jobs in flight on them, the jobs left per model."""

    def __init__(self, jobs: list[BatchJob], count: int, options: dict, threads: int):
        self.options, self.threads = options, threads
        self.left: OrderedDict[str, deque[BatchJob]] = OrderedDict()
        for job in jobs:
            self.left.setdefault(job.model, deque()).append(job)
        self.actors: list = [self._new_actor() for _ in range(count)]
        self.in_flight: dict[ray.ObjectRef, tuple[Any, BatchJob, float]] = {}
        self.last_model: dict[Any, str] = {}
        self.replaced = 0

    def _new_actor(self):
        return BatchActor.options(**self.options).remote(self.threads)

    def _next_job(self, actor) -> BatchJob | None:
        model = self.last_model.get(actor)
        if model not in self.left:
            if not self.left:
                return None
            model = max(self.left, key=lambda m: len(self.left[m]))
        queue = self.left[model]
        job = queue.popleft()
        if not queue:
            del self.left[model]
        self.last_model[actor] = model
        return job

    def dispatch(self) -> None:
        busy = {actor for actor, _, _ in self.in_flight.values()}
        for actor in self.actors:
            if actor not in busy and (job := self._next_job(actor)) is not None:
                job.attempts += 1
                ref = actor.run.remote(job.key, job.params, job_inputs(job))
                self.in_flight[ref] = (actor, job, time.perf_counter())

    def requeue(self, job: BatchJob) -> None:
        self.left.setdefault(job.model, deque()).appendleft(job)
        self.left.move_to_end(job.model, last=False)

    def replace(self, actor) -> None:
        self.actors.remove(actor)
        self.last_model.pop(actor, None)
        self.actors.append(self._new_actor())
        self.replaced += 1


def run_on_ray(
    jobs: list[BatchJob],
    out: Path,
    progress: Progress,
    address: str,
    actors: int = 0,
    cpus_per_actor: int = 1,
    threads: int = 0,
    on_start: Callable[[Scheduler], None] | None = None,
) -> list[Outcome]:
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count, options = actors or gpus, {"num_gpus": 1}
    else:
        count, options = actors or max(1, int(resources.get("CPU", 1)) // cpus_per_actor), {"num_cpus": cpus_per_actor}
    scheduler = Scheduler(jobs, min(count, len(jobs)), options, threads or (0 if gpus else cpus_per_actor))
    if on_start:
        on_start(scheduler)
    outcomes: list[Outcome] = []
    try:
        while scheduler.left or scheduler.in_flight:
            scheduler.dispatch()
            [ref], _ = ray.wait(list(scheduler.in_flight), num_returns=1)
            actor, job, start = scheduler.in_flight.pop(ref)
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor died with the job: try it elsewhere
                scheduler.replace(actor)
                if job.attempts < MAX_ATTEMPTS:
                    scheduler.requeue(job)
                    continue
                outcome = Outcome(job.key, job.line, FAILED, f"its worker died {job.attempts} times: {exc}",
                                  "worker_died", attempts=job.attempts)  # fmt: skip
            except ray.exceptions.RayTaskError as exc:  # a bug in the runner, not in the job's parameters
                outcome = Outcome(job.key, job.line, FAILED, str(exc).splitlines()[-1], "internal_error",
                                  attempts=job.attempts)  # fmt: skip
            else:
                outcome = publish(job, reply, out, time.perf_counter() - start)
            outcomes.append(outcome)
            progress(outcome)
    finally:
        closing = [actor.close.remote() for actor in scheduler.actors]  # each deletes its own temp folders
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for actor in scheduler.actors:
            ray.kill(actor)
    return outcomes
