"""A failed installation says its cause and fix in a line or two, from pip's real output, and ends when pip ends.

The files in pip_output/ are pip 26.3's output (stdout and stderr), recorded here without a network:
- unreachable.txt: `pip download --progress-bar raw --index-url http://127.0.0.1:9/simple nothing`
- nomatch.txt: `pip download --index-url file:///opt/pypi/simple torch==9.9.9` (an index without that version)
- hash.txt: `pip download --require-hashes -r lock.txt` where lock.txt gives idna==3.20 a wrong sha256
- nospace.txt: `pip install --target DIR numpy` with DIR on a 3 MB tmpfs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from blender_sd_addon import installer, installer_errors
from blender_sd_addon.installer import STATE, Phase

RECORDED = Path(__file__).parent / "pip_output"


def pip_phase(recording: str, message: str = "Installing torch (a large download)") -> Phase:
    """A phase that prints a recorded pip output and exits 1, as pip did."""
    code = f"import sys; sys.stdout.write(open({str(RECORDED / recording)!r}).read()); sys.exit(1)"
    return Phase(message, [sys.executable, "-c", code])


pytestmark = pytest.mark.usefixtures("idle_installer")


@pytest.mark.parametrize(
    ("recording", "cause", "fix"),
    [
        ("unreachable.txt", "the package index cannot be reached", "set Torch Index URL"),
        ("nomatch.txt", "the index has no torch==9.9.9 for this computer and Python",
         "set Torch or Torch Index URL in Install Backend"),
        ("hash.txt", "a download does not match the lock's hash", "install again, without a proxy if it repeats"),
        ("nospace.txt", "the disk is full", "free some disk space"),
    ],
)  # fmt: skip
def test_a_failed_phase_names_the_cause_the_fix_and_the_log(tmp_path, recording, cause, fix):
    log = tmp_path / "backend-install.log"
    installer.start_phases([pip_phase(recording)], log).join(timeout=60)

    assert STATE.error and not STATE.running
    assert STATE.short_error.startswith(cause) and STATE.short_error.endswith(fix)
    assert len(STATE.short_error) < 120  # one or two sidebar lines, not pip's 40
    assert "\n" not in STATE.message
    assert STATE.message.startswith("Installing torch (a large download) failed: " + cause)
    assert "Set Interpreter" in STATE.message and STATE.message.endswith(f"Full output: {log}")
    recorded = (RECORDED / recording).read_text().splitlines()
    assert recorded[-1] in log.read_text()  # pip's whole output is in the log the message names


def test_the_unreachable_index_is_named_before_the_missing_version_it_also_reports():
    lines = (RECORDED / "unreachable.txt").read_text().splitlines()
    assert any("No matching distribution found for nothing" in line for line in lines)
    cause, found = installer_errors.find_cause(lines)
    assert cause.text == "the package index cannot be reached" and found == ""


def test_an_unknown_failure_shows_pips_last_error_line_shortened():
    lines = ["Collecting torch", "ERROR: " + "something new went wrong " * 20, "  a traceback line"]
    failure = installer_errors.explain("Installing torch", 2, lines, None)
    assert failure.message.startswith("Installing torch failed: exit code 2: something new went wrong")
    assert failure.short.startswith("exit code 2: something new") and len(failure.short) < 100
    assert installer_errors.find_cause(lines) is None


def test_the_phase_ends_when_pip_exits_even_if_a_child_holds_its_output(tmp_path):
    """A child pip left running (a build helper, a keyring) keeps the pipe open for a minute: the bar must not
    wait for it (it stayed at "17 % · Installing torch" for minutes)."""
    code = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"sys.stdout.write(open({str(RECORDED / 'unreachable.txt')!r}).read()); sys.stdout.flush(); sys.exit(1)"
    )
    phases = [Phase("Updating pip", [sys.executable, "-c", "print('ok')"]),
              Phase("Installing torch", [sys.executable, "-c", code], 6)]  # fmt: skip
    start = time.monotonic()
    thread = installer.start_phases(phases, tmp_path / "install.log")
    thread.join(timeout=20)

    assert not thread.is_alive() and not STATE.running, "still 'Installing' after pip had failed"
    assert time.monotonic() - start < 15  # pip's child sleeps 60 s
    assert STATE.error and STATE.short_error.startswith("the package index cannot be reached")
    assert "No matching distribution found for nothing" in (tmp_path / "install.log").read_text()
