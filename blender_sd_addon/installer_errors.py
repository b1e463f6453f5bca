"""Why an installation phase failed, in one or two lines: the cause found in pip's output and what to do.

Stdlib only and Blender-free. The panel shows this short message; pip's whole output is in the log file it names.
Causes are tried in order: an unreachable index also ends with "Could not find a version", so the network is
named before the missing version.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INTERPRETER_FIX = "or Set Interpreter to a Python that already has torch and diffusers"
LAST_LINE_CHARS = 160  # of an unrecognised error, in the message (the log has all of it)
SHORT_CHARS = 70  # ... in the sidebar's line


@dataclass(frozen=True)
class Cause:
    """A failure recognised by a line of pip's output. `text` may use {found} (the pattern's group 1); `short` is
    the fix in a few words, for the sidebar (its Set Interpreter and Open Log buttons say the rest)."""

    pattern: re.Pattern[str]
    text: str
    fix: str
    short: str


CAUSES = (
    Cause(
        re.compile(
            r"Failed to establish a new connection|Name or service not known|Temporary failure in name resolution"
            r"|getaddrinfo failed|Network is unreachable|No route to host|Connection refused|ConnectTimeoutError"
            r"|Read timed out|ProxyError|Tunnel connection failed|CERTIFICATE_VERIFY_FAILED"
        ),
        "the package index cannot be reached",
        "Check the network and proxy (pip reads HTTPS_PROXY), or set Torch Index URL to an index you can reach",
        "check the network/proxy or set Torch Index URL",
    ),
    Cause(
        re.compile(r"No space left on device|\[Errno 28\]"),
        "the disk is full",
        "Free some space (torch needs several GB) and install again",
        "free some disk space",
    ),
    Cause(
        re.compile(r"THESE PACKAGES DO NOT MATCH THE HASHES"),
        "a download does not match the lock's hash",
        "A proxy or a broken download changed it: install again; if it repeats, download without the proxy",
        "install again, without a proxy if it repeats",
    ),
    Cause(
        re.compile(r"No matching distribution found for (\S+)"),
        "the index has no {found} for this computer and Python",
        "Set Torch (e.g. torch) or Torch Index URL in the Install Backend dialog",
        "set Torch or Torch Index URL in Install Backend",
    ),
    Cause(
        re.compile(r"Permission denied|\[Errno 13\]"),
        "a file could not be written (permission denied)",
        "Stop the backend (Preferences > Stop Backend) and install again",
        "stop the backend and install again",
    ),
)


@dataclass(frozen=True)
class Failure:
    """Why a phase failed: `message` for the preferences and the log, `short` (one or two lines) for the sidebar."""

    message: str
    short: str


def find_cause(lines: Sequence[str]) -> tuple[Cause, str] | None:
    """The first of CAUSES that a line of `lines` shows, and what its group found ("" if it has none)."""
    for cause in CAUSES:
        for line in lines:
            if match := cause.pattern.search(line):
                return cause, (match[1] if match.groups() else "")
    return None


def last_error_line(lines: Sequence[str], limit: int = LAST_LINE_CHARS) -> str:
    """pip's last "ERROR:" line (else the last non-empty one), cut to `limit` characters."""
    errors = [line for line in lines if line.startswith("ERROR:")] or [line for line in lines if line.strip()]
    text = errors[-1].removeprefix("ERROR:").strip() if errors else "no output"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def explain(phase: str, exit_code: int, lines: Sequence[str], log_path: Path | None) -> Failure:
    """A failed phase in words: "<phase> failed: <cause>. <fix>, or Set Interpreter ... Full output: <log>"."""
    found = find_cause(lines)
    if found:
        cause, group = found
        text, fix, short = cause.text.format(found=group), cause.fix, cause.short
    else:
        text, fix = f"exit code {exit_code}: {last_error_line(lines)}", "See the log"
        short = f"exit code {exit_code}: {last_error_line(lines, SHORT_CHARS)}"
        return Failure(f"{phase} failed: {text}. {fix}, {INTERPRETER_FIX}.{_where(log_path)}", short)
    return Failure(f"{phase} failed: {text}. {fix}, {INTERPRETER_FIX}.{_where(log_path)}", f"{text}: {short}")


def _where(log_path: Path | None) -> str:
    return f" Full output: {log_path}" if log_path else ""
