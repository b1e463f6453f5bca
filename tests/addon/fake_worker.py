"""A stand-in worker for client tests: speaks protocol version 2 in JSON lines with scripted behaviour.

    python fake_worker.py MODE

MODE echo: run sends state, status, progress, two artifacts and a result; upload stores bytes by sha256;
    fetch serves a file in chunks of at most 1000 bytes; stats reports how many uploads arrived; other
    methods echo their params.
MODE wrong_version: answers the handshake with protocol version 999.
MODE missing_capabilities: announces only the "jobs" capability.
MODE die_on_run: run sends one progress event, writes a traceback to stderr and exits with code 3.
MODE killed: run writes a warning to stderr and kills itself with SIGKILL.
MODE slow: run sends a progress event every 20 ms for 500 steps, and stops on a cancel notification.
MODE slow_handshake: sleeps 10 s before reading anything (a worker importing torch).
MODE junk: prints text on stdout before the protocol, the last of it on the handshake reply's line.
MODE chatty: before each reply (except the handshake) writes 2 MB to stderr.
Every mode writes a harmless warning to stderr at start, as torchvision does.
"""

import base64
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time

MODE = sys.argv[1]
lines: queue.Queue = queue.Queue()
uploads: dict[str, bytes] = {}
upload_count = 0


def read_stdin() -> None:  # a thread, so a cancel can arrive while a request runs
    for line in sys.stdin:
        lines.put(json.loads(line))
    lines.put(None)


def send(message: dict, prefix: str = "") -> None:
    sys.stdout.write(prefix + json.dumps(message) + "\n")
    sys.stdout.flush()


def progress(request_id: str, step: int, total: int) -> None:
    send({"id": request_id, "event": "progress", "data": {"step": step, "total": total, "elapsed": step * 0.02}})


def run(request_id: str, params: dict) -> None:
    out = params.get("output_dir", "/out")
    send({"id": request_id, "event": "state", "data": {"state": "running"}})
    send({"id": request_id, "event": "status", "data": {"stage": "denoising"}})
    for step in (1, 2, 3):
        progress(request_id, step, 3)
    artifacts = [
        {"path": f"{out}/a.png", "kind": "image", "size": 10, "sha256": "0" * 64, "index": 0, "role": "albedo"},
        {"path": f"{out}/a_normal.png", "kind": "map", "size": 12, "sha256": "1" * 64, "index": 0, "role": "normal"},
    ]
    for artifact in artifacts:
        send({"id": request_id, "event": "artifact", "data": {**artifact, "future_field": 1}})
    result = {
        "images": [{"path": f"{out}/a.png", "seed": 7, "maps": {"normal": f"{out}/a_normal.png"}}],
        "seed": 7,
        "width": 64,
        "height": 64,
        "model": params.get("model", "m"),
        "seamless": "none",
        "timings": {"total": 0.1},
        "params": params,
        "task": params.get("task", "txt2img"),
        "artifacts": artifacts,
    }
    send({"id": request_id, "result": result})


def slow_run(request_id: str) -> None:
    send({"id": request_id, "event": "state", "data": {"state": "running"}})
    for step in range(1, 501):
        progress(request_id, step, 500)
        try:
            message = lines.get(timeout=0.02)
        except queue.Empty:
            continue
        if message and message.get("method") == "cancel" and message["params"]["id"] == request_id:
            send({"id": request_id, "cancelled": True})
            return
    send({"id": request_id, "result": {"steps": 500}})


def fetch(params: dict) -> dict:
    with open(params["path"], "rb") as file:
        data = file.read()
    chunk = data[params["offset"] : params["offset"] + min(params["length"], 1000)]
    eof = params["offset"] + len(chunk) >= len(data)
    return {"data": base64.b64encode(chunk).decode(), "size": len(data), "eof": eof}


def handshake(request_id: str, params: dict) -> None:
    version = 999 if MODE == "wrong_version" else params["protocol_version"]
    capabilities = ["jobs"] if MODE == "missing_capabilities" else ["jobs", "upload", "artifacts", "fetch", "tasks"]
    result = {
        "protocol_version": version,
        "backend_version": "fake",
        "devices": ["cpu"],
        "schedulers": [],
        "tasks": {"txt2img": {"help": "", "params": []}},
        "capabilities": capabilities,
        "unknown_field": 1,
    }
    send({"id": request_id, "result": result}, prefix="warming up... " if MODE == "junk" else "")


print("UserWarning: torchvision.transforms.functional_tensor is deprecated", file=sys.stderr, flush=True)
if MODE == "slow_handshake":
    time.sleep(10)
if MODE == "junk":
    print("Some library says hello on stdout", flush=True)
else:
    print(flush=True)  # the real worker's leading newline
threading.Thread(target=read_stdin, daemon=True).start()
while (request := lines.get()) is not None:
    request_id, method, params = request.get("id"), request.get("method"), request.get("params", {})
    if method == "handshake":
        handshake(request_id, params)
        continue
    if MODE == "chatty":
        for _ in range(2048):
            sys.stderr.write("chatty log line " + "x" * 1000 + "\n")
        sys.stderr.flush()
    if method == "run" and MODE == "die_on_run":
        progress(request_id, 1, 4)
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "fake_worker.py", line 1, in run', file=sys.stderr)
        print("RuntimeError: the fake worker fell over", file=sys.stderr, flush=True)
        sys.exit(3)
    elif method == "run" and MODE == "killed":
        print("UserWarning: TypedStorage is deprecated", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif method == "run" and MODE == "slow":
        slow_run(request_id)
    elif method == "run":
        run(request_id, params)
    elif method == "upload":
        data = base64.b64decode(params["data"])
        digest = hashlib.sha256(data).hexdigest()
        uploads[digest] = data
        upload_count += 1
        send({"id": request_id, "result": {"sha256": digest, "size": len(data)}})
    elif method == "fetch":
        send({"id": request_id, "result": fetch(params)})
    elif method == "stats":
        send({"id": request_id, "result": {"uploads": upload_count}})
    elif method == "shutdown":
        send({"id": request_id, "result": {}})
        break
    elif method:
        send({"id": request_id, "result": {"echo": params}})
