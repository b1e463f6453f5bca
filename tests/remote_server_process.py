"""`python -m backend serve --listen 127.0.0.1:0` as a subprocess (shared by the backend and add-on tests)."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from worker_process import REPO

from blender_sd_addon.client import BackendClient
from blender_sd_addon.remote import RemoteSettings
from sdtex_contract import protocol


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


class Raw:
    """A hand-driven client: JSON lines (or anything) over TLS trusting `cafile`, or plain TCP without."""

    def __init__(self, port: int, cafile: str = ""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if cafile:
            self.sock = ssl.create_default_context(cafile=cafile).wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buffer = b""

    def send(self, message: dict) -> None:
        self.sock.sendall(protocol.encode(message))

    def handshake(self, token: str | None) -> dict:
        params = {"protocol_version": protocol.PROTOCOL_VERSION} | ({"token": token} if token is not None else {})
        self.send(protocol.request("h", protocol.HANDSHAKE, params))
        return self.receive()

    def receive(self) -> dict | None:
        """The next message; None when the server closed the connection."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def terminal(self, request_id: str) -> dict:
        while (message := self.receive()) is not None:
            if message.get("id") == request_id and protocol.is_terminal(message):
                return message
        raise AssertionError(f"connection closed before {request_id} was answered")

    def closed_by_server(self) -> bool:
        """Whether the server ends the connection (everything it still sends is read and dropped)."""
        try:
            while self.sock.recv(1 << 16):
                pass
        except (ConnectionResetError, ssl.SSLError):  # reset, or TLS cut without its closing message
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, made here with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdtex test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(names, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key_file
