"""A stand-in worker for client tests: speaks the JSON-lines protocol with scripted behaviour.

    python fake_worker.py MODE

MODE wrong_version: answers the handshake with protocol version 999.
MODE die_on_generate: sends one progress event, writes to stderr and exits with code 3.
MODE slow: generate sends a progress event every 20 ms for 500 steps, and stops on a cancel notification.
Other methods echo their params.
"""

import json
import queue
import sys
import threading

MODE = sys.argv[1]
lines: queue.Queue = queue.Queue()


def read_stdin() -> None:  # a thread, so a cancel can arrive while a request runs
    for line in sys.stdin:
        lines.put(json.loads(line))
    lines.put(None)


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def slow_generate(request_id: str) -> None:
    for step in range(1, 501):
        send({"id": request_id, "event": "progress", "data": {"step": step, "total": 500, "elapsed": step * 0.02}})
        try:
            message = lines.get(timeout=0.02)
        except queue.Empty:
            continue
        if message and message.get("method") == "cancel" and message["params"]["id"] == request_id:
            send({"id": request_id, "cancelled": True})
            return
    send({"id": request_id, "result": {"steps": 500}})


threading.Thread(target=read_stdin, daemon=True).start()
while (request := lines.get()) is not None:
    request_id, method = request.get("id"), request.get("method")
    if method == "handshake":
        version = 999 if MODE == "wrong_version" else request["params"]["protocol_version"]
        result = {
            "protocol_version": version,
            "backend_version": "fake",
            "devices": ["cpu"],
            "schedulers": [],
            "tasks": ["txt2img"],
            "unknown_field": 1,
        }
        send({"id": request_id, "result": result})
    elif method == "generate" and MODE == "die_on_generate":
        send({"id": request_id, "event": "progress", "data": {"step": 1, "total": 4, "elapsed": 0.1}})
        print("RuntimeError: the fake worker fell over", file=sys.stderr, flush=True)
        sys.exit(3)
    elif method == "generate" and MODE == "slow":
        slow_generate(request_id)
    elif method == "shutdown":
        send({"id": request_id, "result": {}})
        break
    elif method:
        send({"id": request_id, "result": {"echo": request["params"]}})
