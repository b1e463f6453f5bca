"""`python -m backend serve --listen 127.0.0.1:0` as a subprocess (shared by the backend and add-on tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from worker_process import REPO

from blender_sd_addon.client import BackendClient
from blender_sd_addon.remote import RemoteSettings


class ServerProcess:
    """`python -m backend serve --listen 127.0.0.1:0 ...` in a subprocess; reads its token and port.

    With a certificate (cert, key) it serves TLS, and its clients trust that certificate."""

    def __init__(self, config: Path, *args: str, certificate: tuple[Path, Path] | None = None):
        self.config = config
        self.cafile = str(certificate[0]) if certificate else ""
        if certificate:
            args = (*args, "--certfile", str(certificate[0]), "--keyfile", str(certificate[1]))
        self.stderr = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "backend", "serve", "--listen", "127.0.0.1:0", "--config-dir", str(config)]
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            text=True,
        )
        self.printed_token = None
        for line in self.proc.stdout:
            if match := re.match(r"sdtex-server token \(stored in .*\): (\S+)", line):
                self.printed_token = match.group(1)
            if match := re.match(r"sdtex-server listening on \w+://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                break
        else:
            self.stderr.seek(0)
            raise RuntimeError("the server did not start:\n" + self.stderr.read().decode()[-3000:])
        self.token = (config / "server-token").read_text().strip()
        self.address = f"127.0.0.1:{self.port}"

    def client(self, token: str | None = None, cafile: str | None = None) -> BackendClient:
        """A client (TLS when the server has a certificate: trusting `cafile`, by default the server's)."""
        tls = {"tls": True, "cafile": self.cafile if cafile is None else cafile} if self.cafile else {}
        return BackendClient.connect_remote(RemoteSettings(self.address, self.token if token is None else token, **tls))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
