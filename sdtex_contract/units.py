"""Sizes and transfers for people, the same words in the panel, the CLI and the logs."""

from __future__ import annotations


def size_text(size: float) -> str:
    """Bytes for people: 812 KB, 312 MB, 2.1 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size:.0f} B"


def transfer_text(done: float, total: float, speed: float = 0.0) -> str:
    """ "312 MB of 2.1 GB · 14 MB/s" (total 0: unknown; speed 0: not shown)."""
    text = f"{size_text(done)} of {size_text(total)}" if total else size_text(done)
    return text + (f" · {size_text(speed)}/s" if speed > 0 else "")
