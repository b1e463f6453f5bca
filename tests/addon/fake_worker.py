"""A stand-in worker for client tests: speaks the JSON-lines protocol with scripted misbehaviour.

python fake_worker.py MODE     MODE: wrong_version | die_on_generate | echo
"""

import json
import sys

MODE = sys.argv[1]


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    request = json.loads(line)
    request_id, method = request.get("id"), request.get("method")
    if method == "handshake":
        version = 999 if MODE == "wrong_version" else request["params"]["protocol_version"]
        send(
            {
                "id": request_id,
                "result": {
                    "protocol_version": version,
                    "backend_version": "fake",
                    "devices": ["cpu"],
                    "schedulers": [],
                    "tasks": ["txt2img"],
                    "unknown_field": 1,
                },
            }
        )
    elif method == "generate" and MODE == "die_on_generate":
        send({"id": request_id, "event": "progress", "data": {"step": 1, "total": 4, "elapsed": 0.1}})
        print("RuntimeError: the fake worker fell over", file=sys.stderr, flush=True)
        sys.exit(3)
    elif method == "shutdown":
        send({"id": request_id, "result": {}})
        break
    elif method:
        send({"id": request_id, "result": {"echo": request["params"]}})
