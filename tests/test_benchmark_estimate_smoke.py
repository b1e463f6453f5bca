"""The estimate benchmark runs end to end on a tiny model and writes a well-formed report.

No timing assertions: speed belongs in the benchmark's own output, not in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_estimate_benchmark_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "estimate.json"
    command = ["-m", "benchmarks.estimate", "--architecture", "tiny", "--size", "48", "--repeats", "2"]
    proc = subprocess.run(
        [sys.executable, *command, "--kind", "intrinsics", "--device", "cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kind"] == "intrinsics" and result["size"] == 48 and result["processing_resolution"] == 48
    assert result["same_maps"], "our estimate and diffusers' pipeline gave different maps"
    assert [len(result["samples_s"][side]) for side in ("ours", "bare")] == [2, 2]
    for key in ("ours_s", "bare_s", "ratio", "cpu_ratio"):
        assert result[key] > 0, key
    assert result["ours_s"] == min(result["samples_s"]["ours"]) and result["bare_s"] == min(result["samples_s"]["bare"])
    assert result["met"] == (result["ratio"] <= result["target"])
    assert "ratio" in proc.stdout  # the summary was printed
