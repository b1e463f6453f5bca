"""The TCP server's token (made once, stored user-only) and the address checks around it."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

TOKEN_FILE = "server-token"


def config_dir() -> Path:
    """Where the token lives: $SDTEX_CONFIG_DIR, else the platform's user config folder + sd-textures."""
    if custom := os.environ.get("SDTEX_CONFIG_DIR"):
        return Path(custom)
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "sd-textures"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "sd-textures"


def load_or_create_token(folder: Path) -> tuple[str, bool]:
    """The server's token and whether it was just made. A token file others can read is refused."""
    path = folder / TOKEN_FILE
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
    else:
        token = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, True
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise SystemExit(f"{path} is readable by other users: chmod 600 it (or delete it for a new token)")
    if len(token) < 16:
        raise SystemExit(f"{path} holds no usable token (at least 16 characters): delete it for a new one")
    return token, False


def token_matches(expected: str, given: Any) -> bool:
    """Constant-time comparison (on bytes: compare_digest refuses non-ASCII str)."""
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def is_loopback(host: str) -> bool:
    """Every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
