"""What the GUI tests do with a driver's run: read its report and keep the screenshots, the report and
Blender's log as artifacts (CI keeps artifacts/)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path


def read_report(done: subprocess.CompletedProcess, out: Path, artifacts: Path) -> dict:
    """The driver's report.json from `out`, its screenshots and Blender's output copied to `artifacts`; fails
    with Blender's output when there is no report, with the driver's tracebacks when it has errors."""
    report_path = out / "report.json"
    assert report_path.is_file(), f"the driver wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    artifacts.mkdir(parents=True, exist_ok=True)
    for name, path in report["screenshots"].items():
        shutil.copy(path, artifacts / name)
    (artifacts / "report.json").write_text(json.dumps(report, indent=2))
    (artifacts / "blender.log").write_text(done.stdout + done.stderr)
    assert not report["errors"], "\n".join(report["errors"])
    return report
