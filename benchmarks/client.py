"""Scenario: the add-on's BackendClient in a plain Python process, driving real backend workers.

1. Cold: spawn a worker, handshake, generate (the worker loads the model, then makes the first image).
2. Warm: one more generate request to the same worker per turn, each timed from submit to terminal reply,
   with the receive time of every progress event; then the worker's peak RSS (VmHWM).
3. Early start: a second worker is spawned and sent load_model ahead of time; the generate request is
   then timed from the "click".
"""

from __future__ import annotations

import hashlib
import json

import PIL.Image

from benchmarks.common import PYTHON, REPO, next_turn, now, proc_status_kib, scenario_args, signal
from blender_sd_addon.client import BackendClient
from sdtex_contract import protocol


def new_client(log_path) -> BackendClient:
    return BackendClient([PYTHON, "-m", "backend", "serve"], pythonpath=[str(REPO)], log_path=log_path)


def timed_generate(client: BackendClient, params: dict) -> dict:
    """One generate request: wall time, worker timings, progress events (received at, worker elapsed)."""
    progress = []

    def on_event(message: dict) -> None:
        if message.get("event") == protocol.EVENT_PROGRESS:
            progress.append({"received_at": now(), **message["data"]})

    start = now()
    reply = client.result(client.wait(client.submit(protocol.RUN, {"task": "txt2img", **params}), on_event=on_event))
    end = now()
    with PIL.Image.open(reply["images"][0]["path"]) as image:
        pixels = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
    return {"start": start, "end": end, "wall": end - start, "timings": reply["timings"], "progress": progress,
            "pixels_sha256": pixels}


def main() -> None:
    config, out = scenario_args()
    params = config["params"]
    log_path = out.with_suffix(".worker.log")

    # 1. Cold: spawn + handshake + load + first image
    client = new_client(log_path)
    cold_start = now()
    client.start()
    handshake_at = now()
    cold = timed_generate(client, params)

    # 2. Warm runs on the same worker, one per turn
    signal("ready")
    warm = []
    while next_turn():
        warm.append(timed_generate(client, params))
        signal("done")
    worker_pid = client.pid
    worker_hwm = proc_status_kib(worker_pid, "VmHWM")
    worker_rss = proc_status_kib(worker_pid, "VmRSS")
    client.shutdown()

    # 3. Early start: the worker is up and the model loaded before the click
    early_client = new_client(log_path)
    early_spawn = now()
    early_client.start()
    load = early_client.request(protocol.LOAD_MODEL, {"model": params["model"]})
    loaded_at = now()
    click = timed_generate(early_client, params)
    early_client.shutdown()

    out.write_text(json.dumps({
        "cold": {"start": cold_start, "handshake_at": handshake_at, "first_image_at": cold["end"], "run": cold},
        "warm": warm,
        "worker_vm_hwm_kib": worker_hwm,
        "worker_vm_rss_kib": worker_rss,
        "early": {"spawn": early_spawn, "loaded_at": loaded_at, "load_seconds": load.get("load_seconds"),
                  "click": click},
    }))


if __name__ == "__main__":
    main()
