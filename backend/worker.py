"""The worker: JSON lines on stdin/stdout (blender_sd_addon.protocol), one request at a time.

A reader thread parses stdin: cancel notifications take effect at once, malformed lines are answered at
once, requests queue for the main thread. Every request gets exactly one terminal reply; an error in
one request never stops the worker.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, BinaryIO

import diffusers
import torch
import transformers
from diffusers import StableDiffusionXLPipeline

from backend import __version__
from backend.models import ModelManager, available_devices
from backend.outputs import save_images
from backend.previews import SD_FACTORS, SDXL_FACTORS, preview_event
from backend.tasks import TASKS, Cancelled
from backend.tasks.txt2img import size_multiple
from blender_sd_addon import protocol
from blender_sd_addon.protocol import (
    GENERATE_PARAMS,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    OUT_OF_MEMORY,
    GenerateParams,
    GenerateResult,
    HandshakeResult,
    ProgressEvent,
    ProtocolError,
)

log = logging.getLogger("backend.worker")

Emit = Callable[[dict], None]
MODEL_PARAMS = ("model", "device", "dtype", "cpu_offload", "attention_slicing", "allow_pickle")
OOM_ADVICE = (
    "out of memory: try a smaller width/height, batch_size 1, cpu_offload (CUDA), attention_slicing "
    "or vae_tiling (not while seamless)"
)


def request_id_of(message: dict) -> str | int | None:
    """The message's id when it is a usable one (a string or an integer), else None."""
    request_id = message.get("id")
    return request_id if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) else None


def parse_request(message: dict) -> tuple[Any, str, dict]:
    """(id, method, params) of a request, or ProtocolError naming what is wrong with it."""
    request_id = request_id_of(message)
    if request_id is None:
        raise ProtocolError(INVALID_REQUEST, "a request needs an id (string or integer)")
    method = message.get("method")
    if not isinstance(method, str):
        raise ProtocolError(INVALID_REQUEST, "a request needs a method (string)")
    if method not in protocol.METHODS:
        raise ProtocolError(METHOD_NOT_FOUND, f"unknown method {method!r}; methods: {', '.join(protocol.METHODS)}")
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError(INVALID_REQUEST, f"params must be an object, got {type(params).__name__}")
    return request_id, method, params


def model_params(params: dict) -> GenerateParams:
    """Validate the model-related subset of the generate parameters (for load_model)."""
    values = {p.name: p.check(params[p.name]) for p in GENERATE_PARAMS if p.name in MODEL_PARAMS and p.name in params}
    if not values.get("model", "").strip():
        raise ProtocolError(
            INVALID_PARAMS, "model must be a non-empty string", {"param": "model", "value": values.get("model", "")}
        )
    return GenerateParams(**values)


class Worker:
    """Serves requests one at a time. `emit` sends one message; `cancel` may be called from any thread."""

    def __init__(self, emit: Emit):
        self.emit = emit
        self.models = ModelManager()
        self._lock = threading.Lock()
        self._active: set = set()  # ids queued or running
        self._cancelled: set = set()

    # --- cancellation (reader thread) ---------------------------------------------------------------

    def accept(self, request_id: Any) -> None:
        with self._lock:
            self._active.add(request_id)

    def cancel(self, request_id: Any) -> None:
        with self._lock:
            if request_id in self._active:
                self._cancelled.add(request_id)

    def is_cancelled(self, request_id: Any) -> bool:
        with self._lock:
            return request_id in self._cancelled

    # --- requests (main thread) --------------------------------------------------------------------

    def handle(self, message: dict) -> bool:
        """Answer one request with exactly one terminal reply. False once the worker should exit."""
        request_id = request_id_of(message)
        if request_id is not None:
            self.accept(request_id)  # the reader thread did so already when serving; direct callers did not
        try:
            request_id, method, params = parse_request(message)
            if self.is_cancelled(request_id):
                raise Cancelled()
            if method == protocol.HANDSHAKE:
                reply = self.handshake(params)
            elif method == protocol.GENERATE:
                reply = asdict(self.generate(request_id, GenerateParams.from_dict(params)))
            elif method == protocol.LOAD_MODEL:
                reply = self.load_model(model_params(params))
            else:  # shutdown
                self.emit(protocol.result(request_id, {}))
                return False
            self.emit(protocol.result(request_id, reply))
        except Cancelled:
            self.emit(protocol.cancelled(request_id))
        except ProtocolError as exc:
            self.emit(protocol.error(request_id, exc))
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.free_memory()
            log.error("%s: %s", OOM_ADVICE, exc)
            self.emit(protocol.error(request_id, ProtocolError(OUT_OF_MEMORY, OOM_ADVICE, {"detail": str(exc)})))
        except Exception as exc:
            log.exception("request %r failed", request_id)
            failure = ProtocolError(
                INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", {"traceback": traceback.format_exc()}
            )
            self.emit(protocol.error(request_id, failure))
        finally:
            with self._lock:
                self._active.discard(request_id)
                self._cancelled.discard(request_id)
        return True

    def handshake(self, params: dict) -> dict:
        protocol.check_protocol_version(params.get("protocol_version"))
        return asdict(
            HandshakeResult(
                protocol_version=protocol.PROTOCOL_VERSION,
                backend_version=__version__,
                devices=available_devices(),
                schedulers=list(protocol.SCHEDULERS),
                tasks=list(protocol.TASKS),
                torch_version=torch.__version__,
                diffusers_version=diffusers.__version__,
                loaded_model=self.models.loaded_name,
            )
        )

    def load_model(self, params: GenerateParams) -> dict:
        """Load the model and run one small denoising step on it when it was not warm yet, so the first
        click does not pay for paging in the memory-mapped weights and the backend's kernel set-up."""
        model, seconds = self.models.get(params)
        warmup = 0.0
        if seconds:
            start = time.perf_counter()
            size = max(64, size_multiple(model.pipe))
            probe = GenerateParams(
                model=params.model, prompt="warm-up", output_dir="/unused", seed=0, steps=1, width=size, height=size
            )
            TASKS["txt2img"](model.pipe, probe, device=model.device)
            warmup = time.perf_counter() - start
        key = model.key
        return {
            "model": key.source.location,
            "load_seconds": seconds,
            "warmup_seconds": warmup,
            "device": key.device,
            "dtype": key.dtype,
        }

    def generate(self, request_id: Any, params: GenerateParams) -> GenerateResult:
        """Load (or reuse) the model, run the task, save the files; events stream through emit."""
        start = time.perf_counter()
        self._status(request_id, "loading_model")
        model, load_seconds = self.models.get(params)
        factors = SDXL_FACTORS if isinstance(model.pipe, StableDiffusionXLPipeline) else SD_FACTORS
        denoise_start = time.perf_counter()

        def on_stage(stage: str) -> None:
            nonlocal denoise_start
            if stage == "denoising":
                denoise_start = time.perf_counter()
            self._status(request_id, stage)

        def on_step(step: int, total: int, latents: torch.Tensor) -> None:
            progress = ProgressEvent(step=step, total=total, elapsed=time.perf_counter() - denoise_start)
            self.emit(protocol.event(request_id, protocol.EVENT_PROGRESS, asdict(progress)))
            if params.preview_every and step % params.preview_every == 0:
                preview = preview_event(step, latents, factors)
                self.emit(protocol.event(request_id, protocol.EVENT_PREVIEW, asdict(preview)))

        output = TASKS[params.task](
            model.pipe,
            params,
            on_step=on_step,
            should_cancel=lambda: self.is_cancelled(request_id),
            on_stage=on_stage,
            device=model.device,
        )
        self._status(request_id, "saving")
        save_start = time.perf_counter()
        records = save_images(output.images, output.seeds, params)
        timings = {"load": load_seconds, **output.timings, "save": time.perf_counter() - save_start}
        timings["total"] = time.perf_counter() - start
        return GenerateResult(
            images=records,
            seed=output.seeds[0],
            width=params.width,
            height=params.height,
            model=params.model,
            seamless=params.seamless,
            timings=timings,
            params=params.to_dict(),
        )

    def free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _status(self, request_id: Any, stage: str) -> None:
        self.emit(protocol.event(request_id, protocol.EVENT_STATUS, {"stage": stage}))


# --- serving over stdin/stdout --------------------------------------------------------------------


class _Writer:
    """Thread-safe JSON-lines writer on the private copy of the real stdout."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, message: dict) -> None:
        data = protocol.encode(message)
        with self.lock:
            try:
                self.stream.write(data)
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # the client is gone; stdin EOF ends the worker
                log.warning("client gone; dropped %s", message.get("event") or "reply")


def _read(stdin: BinaryIO, worker: Worker, requests: queue.Queue) -> None:
    """Reader thread: route each line; None on the queue means EOF."""
    for line in stdin:
        if not line.strip():
            continue
        try:
            message = protocol.decode(line)
        except ProtocolError as exc:
            worker.emit(protocol.error(None, exc))
            continue
        if message.get("method") == protocol.CANCEL:
            params = message.get("params")
            if isinstance(params, dict):
                worker.cancel(params.get("id"))
            continue
        if (request_id := request_id_of(message)) is not None:
            worker.accept(request_id)  # so a cancel for a queued request counts
        requests.put(message)
    requests.put(None)  # EOF: finish what was asked, then exit


def quiet_libraries() -> None:
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[sdtex-backend] %(levelname)s %(message)s")


def serve() -> int:
    """Serve until shutdown or EOF on stdin. Returns the exit status (0)."""
    # Keep the real stdout for the protocol and send fd 1 to stderr, so stray prints and progress
    # bars from libraries can never corrupt a message.
    out = os.fdopen(os.dup(1), "wb")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    quiet_libraries()

    # The reader thread may still be blocked in a read at exit: give it a private stdin, because
    # finalising sys.stdin while a daemon thread holds its lock aborts the interpreter.
    stdin = os.fdopen(os.dup(0), "rb")
    worker = Worker(_Writer(out))
    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_read, args=(stdin, worker, requests), daemon=True).start()
    log.info("backend %s ready (protocol %d)", __version__, protocol.PROTOCOL_VERSION)
    while (message := requests.get()) is not None:
        if not worker.handle(message):
            break
    out.close()
    return 0
