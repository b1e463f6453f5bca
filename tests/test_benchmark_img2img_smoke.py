"""The img2img benchmark runs end to end on the tiny model and writes a well-formed report.

No timing assertions: speed belongs in the benchmark's own output, not in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RUNS_FACTOR

REPO = Path(__file__).resolve().parents[1]


def test_quick_img2img_tiny_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "img2img_tiny", "--runs", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["img2img_tiny"]

    result = report["results"]["img2img_tiny"]
    assert result["runs"] == RUNS_FACTOR["tiny"]  # --runs 1, times the tiny model's factor
    assert result["same_pixels"], "our img2img and diffusers' img2img pipeline made different pictures"
    assert result["settings"]["denoising_steps"] == 2  # 4 steps at strength 0.5
    for key in ("bare_ms", "backend_ms", "ratio", "paired_ratio", "txt2img_denoise_ms", "predicted_ms"):
        assert result[key] > 0, key
    assert set(result["backend_stages_ms"]) == {"encode", "encode_image", "denoise", "decode"}
    assert len(result["targets"]) == 2
    for check in result["targets"]:
        assert check["met"] == (check["value"] <= check["limit"]), check
        assert check["verdict"] in ("met", "missed", "inconclusive"), check
    assert "img2img_tiny" in proc.stdout  # the table was printed
