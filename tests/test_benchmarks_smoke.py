"""The benchmark harness runs end to end on the tiny model and writes a well-formed report.

No timing assertions: speed belongs in the benchmark's own output, not in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RUNS_FACTOR

REPO = Path(__file__).resolve().parents[1]


def test_quick_warm_tiny_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "warm_tiny", "--runs", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["command"].endswith("-m benchmarks --quick --only warm_tiny --runs 1 --out " + str(out))
    assert report["machine"]["nproc"] > 0 and report["machine"]["ram_gib"] > 0
    assert report["versions"]["torch"] and report["versions"]["diffusers"]
    assert list(report["results"]) == ["warm_tiny"]

    warm = report["results"]["warm_tiny"]
    assert warm["runs"] == RUNS_FACTOR["tiny"]  # --runs 1, times the tiny model's factor
    for key in ("bare_ms", "bare_pipe_ms", "backend_ms", "backend_worker_total_ms", "addon_ms", "backend_ratio",
                "addon_ratio"):
        assert warm[key] > 0, key
    assert warm["backend_ms"] >= warm["backend_worker_total_ms"]  # the client's wall time holds the worker's
    assert warm["same_pixels"], "bare diffusers and the backend made different images from the same request"
    assert warm["addon_applied"], "the operator did not put the image on the Cube"
    assert len(warm["targets"]) == 4
    for check in warm["targets"]:
        assert check["met"] == (check["value"] <= check["limit"]), check
        assert check["verdict"] in ("met", "missed", "inconclusive") and check["band"] >= 0, check
    assert "warm_tiny" in proc.stdout  # the table was printed
