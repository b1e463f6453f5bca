"""Measurement: a remote backend's overhead per request against the local subprocess, over loopback.

Two workers on the same model, both warm, driven by the add-on's own client (BackendClient) in this
process, taking turns (who goes first rotates each round):
- local: `python -m backend serve` over stdio, as the add-on starts it; the PNG is written where asked.
- remote: `python -m backend serve --listen 127.0.0.1:0` (token, TCP); the client uploads nothing here,
  and fetches every artifact into the local folder before the reply is handed over (what the add-on does).
Rows: a generate request's wall time on each side and their difference (the remote's overhead, with its
~95% band), and a `jobs` round trip (the transport alone). Target: overhead below 10% of the local time for
the SD-1.5 architecture (256 px, 2 steps); the tiny model shows the fixed cost in milliseconds.
The same seed must give the same pixels on both sides.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    PYTHON,
    REPO,
    RUNS_FACTOR,
    Scenarios,
    difference_band,
    generate_params,
    median,
    median_error,
    model_dir,
    target,
)
from blender_sd_addon.client import BackendClient
from blender_sd_addon.remote import RemoteSettings
from sdtex_contract import protocol

OVERHEAD_TARGET = 0.10  # remote overhead / local time, at most (sd15)
PINGS = 50


def start_server(config: Path, model: Path) -> tuple[subprocess.Popen, str, str]:
    command = [PYTHON, "-m", "backend", "serve", "--listen", "127.0.0.1:0", "--config-dir", str(config),
               "--models-dir", str(model.parent)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if match := re.search(r"listening on tcp://(\S+)", line):
            return proc, match.group(1), (config / "server-token").read_text().strip()
    raise RuntimeError("the remote backend did not start")


def pixels_digest(path: str) -> str:
    import PIL.Image  # the parent has Pillow (the add-on's tests need it); no torch here

    with PIL.Image.open(path) as image:
        return hashlib.sha256(image.tobytes()).hexdigest()


def measure(scenarios: Scenarios, architecture: str) -> dict:
    model = model_dir(architecture)
    runs = scenarios.runs * RUNS_FACTOR[architecture]
    scratch = Path(tempfile.mkdtemp(prefix=f"remote-{architecture}-", dir=scenarios.scratch))
    print(f"starting remote ({architecture}) ...", file=sys.stderr, flush=True)
    proc, address, token = start_server(scratch / "config", model)
    local = BackendClient([PYTHON, "-m", "backend", "serve"], pythonpath=[str(REPO)])  # as benchmarks/client.py
    remote = BackendClient.connect_remote(RemoteSettings(address, token))
    sides = {"local": local, "remote": remote}
    walls: dict[str, list[float]] = {name: [] for name in sides}
    digests: dict[str, set[str]] = {name: set() for name in sides}
    pings: dict[str, list[float]] = {name: [] for name in sides}
    fetches: list[float] = []
    last: dict[str, str] = {}  # each side's last image file name
    try:
        for name, client in sides.items():  # start, load and warm both
            client.request(protocol.RUN, {"task": "txt2img", **generate_params(architecture, model, scratch / name)},
                           timeout=900)  # fmt: skip
        order = list(sides)
        for i in range(runs):
            print(f"remote round {i + 1}/{runs} ...", file=sys.stderr, flush=True)
            for name in order[i % 2 :] + order[: i % 2]:
                params = generate_params(architecture, model, scratch / f"{name}-{i}")
                start = time.perf_counter()
                result = sides[name].request(protocol.RUN, {"task": "txt2img", **params}, timeout=600)
                walls[name].append(time.perf_counter() - start)
                digests[name].add(pixels_digest(result["images"][0]["path"]))
                last[name] = Path(result["images"][0]["path"]).name
        for name, client in sides.items():
            for _ in range(PINGS):
                start = time.perf_counter()
                client.request(protocol.JOBS, timeout=60)
                pings[name].append(time.perf_counter() - start)
        # What the remote adds per file: fetching it (the last image, by its name in the server's folder).
        served = str(scratch / "config" / "outputs" / last["remote"])
        for _ in range(PINGS):
            start = time.perf_counter()
            size = len(remote.fetch(served, timeout=60))
            fetches.append(time.perf_counter() - start)
    finally:
        local.shutdown()
        remote.shutdown()
        proc.terminate()
        proc.wait(30)
    return summarise(architecture, walls, pings, digests, fetches, size)


def summarise(architecture: str, walls: dict, pings: dict, digests: dict, fetches: list, size: int) -> dict:
    local_ms, remote_ms = 1000 * median(walls["local"]), 1000 * median(walls["remote"])
    band = 1000 * difference_band(walls["local"], walls["remote"])
    # Each round ran both sides back to back: their difference cancels most of a load that changes slowly.
    paired = [1000 * (r - lo) for lo, r in zip(walls["local"], walls["remote"], strict=True)]
    result = {
        "runs": len(walls["local"]),
        "local_ms": round(local_ms, 2),
        "remote_ms": round(remote_ms, 2),
        "overhead_ms": round(remote_ms - local_ms, 2),
        "overhead_band_ms": round(band, 2),
        "overhead_fraction": round((remote_ms - local_ms) / local_ms, 4),
        "paired_overhead_ms": round(median(paired), 2),
        "paired_band_ms": round(2 * median_error(paired), 2),
        "ping_local_ms": round(1000 * median(pings["local"]), 3),
        "ping_remote_ms": round(1000 * median(pings["remote"]), 3),
        "fetch_ms": round(1000 * median(fetches), 3),
        "fetch_bytes": size,
        "same_pixels": len(digests["local"] | digests["remote"]) == 1,
        "samples_s": {name: [round(w, 4) for w in values] for name, values in walls.items()},
    }
    result["targets"] = [
        target(f"remote overhead / local time <= {OVERHEAD_TARGET} (paired)", round(median(paired) / local_ms, 4),
               OVERHEAD_TARGET, result["paired_band_ms"] / local_ms),
    ] if architecture == "sd15" else []  # fmt: skip
    result["rows"] = [
        {"metric": "generate ms: local / remote", "bare": result["local_ms"], "backend": result["remote_ms"],
         "ratio": round(remote_ms / local_ms, 4)},
        {"metric": "  remote overhead ms (+- ~95%)",
         "backend": f"{result['overhead_ms']} +- {result['overhead_band_ms']}"},
        {"metric": "  median of per-round differences ms",
         "backend": f"{result['paired_overhead_ms']} +- {result['paired_band_ms']}"},
        {"metric": "`jobs` round trip ms: local / remote", "bare": result["ping_local_ms"],
         "backend": result["ping_remote_ms"]},
        {"metric": f"fetch of one result PNG ({size} bytes) ms", "backend": result["fetch_ms"]},
        {"metric": "same pixels", "backend": str(result["same_pixels"])},
    ]  # fmt: skip
    return result
