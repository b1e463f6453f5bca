"""The TCP server against its own users and strangers: a client fetches only its own jobs' files and does not
learn another's model, strangers holding sockets open do not lock token holders out, the documented largest
upload goes through and the quota stops the next, and TLS clients that talk at once are answered."""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path

import pytest
from remote_server_process import Raw, ServerProcess, self_signed

from sdtex_contract import protocol

QUOTA = 50 * 2**20


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory):
    pytest.importorskip("cryptography")
    certificate = self_signed(tmp_path_factory.mktemp("tls"))
    process = ServerProcess(
        tmp_path_factory.mktemp("server-config"),
        "--models-dir", str(tiny_model_dir.parent), "--max-connections", "2", "--handshake-timeout", "20",
        "--upload-quota", str(QUOTA),
        certificate=certificate,
    )  # fmt: skip
    yield process
    process.close()


def connect(server: ServerProcess) -> Raw:
    raw = Raw(server.port, server.cafile)
    assert "result" in raw.handshake(server.token)
    return raw


def test_a_client_fetches_only_its_own_files_and_never_sees_another_model(server: ServerProcess, tiny_model_dir):
    alice = connect(server)
    job = {"task": "txt2img", "model": str(tiny_model_dir), "prompt": "moss", "steps": 1, "width": 64, "height": 64}
    alice.send(protocol.request("a", protocol.RUN, job | {"seed": 3}))
    artifacts = []
    while (message := alice.receive()) and not protocol.is_terminal(message):
        if message.get("event") == protocol.EVENT_ARTIFACT:
            artifacts.append(message["data"]["path"])
    assert "result" in message and len(artifacts) == 1
    name = Path(artifacts[0]).name
    assert name.startswith("sdtex_") and name.endswith("_3.png") and len(name.split("-")[-1]) == len("0123abcd_3.png")
    alice.send(protocol.request("f", protocol.FETCH, {"path": artifacts[0]}))
    assert alice.terminal("f")["result"]["eof"]

    bob = Raw(server.port, server.cafile)
    handshake = bob.handshake(server.token)["result"]
    assert handshake["loaded_model"] is None  # alice's model path is hers
    bob.send(protocol.request("f", protocol.FETCH, {"path": artifacts[0]}))
    refused = bob.terminal("f")["error"]
    bob.send(protocol.request("g", protocol.FETCH, {"path": artifacts[0] + ".missing"}))
    missing = bob.terminal("g")["error"]
    assert refused["code"] == missing["code"] == protocol.NOT_FOUND
    assert refused["message"].replace(name, "X") == missing["message"].replace(name + ".missing", "X")
    alice.close()
    bob.close()


def test_strangers_holding_sockets_do_not_lock_a_token_holder_out(server: ServerProcess):
    strangers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]  # silent: no TLS, no token
    try:
        holder = Raw(server.port, server.cafile)  # 8 strangers, --max-connections 2: it still gets in
        assert "result" in holder.handshake(server.token)
        holder.close()
    finally:
        for sock in strangers:
            sock.close()


def test_the_documented_largest_upload_goes_through_and_the_quota_stops_the_next(server: ServerProcess):
    client = connect(server)
    largest = os.urandom(protocol.UPLOAD_MAX)
    client.send(protocol.request("u", protocol.UPLOAD, {"data": base64.b64encode(largest).decode()}))
    assert client.terminal("u")["result"]["size"] == protocol.UPLOAD_MAX
    more = os.urandom(QUOTA - protocol.UPLOAD_MAX + 1)
    client.send(protocol.request("v", protocol.UPLOAD, {"data": base64.b64encode(more).decode()}))
    error = client.terminal("v")["error"]
    assert error["data"] == {"param": "data", "quota": QUOTA, "used": protocol.UPLOAD_MAX, "size": len(more)}
    assert f"upload quota exceeded: this upload is {len(more)} bytes" in error["message"]
    client.close()


def test_tls_clients_that_send_the_handshake_at_once_are_answered(server: ServerProcess):
    """Each sends its TLS handshake and its token in one go; a reader that waited in select() for bytes TLS had
    already buffered would sit until --handshake-timeout (20 s) and close it unanswered."""
    unanswered = 0
    for _ in range(60):
        raw = Raw(server.port, server.cafile)
        reply = raw.handshake(server.token)
        unanswered += reply is None or "result" not in reply
        raw.close()
    assert unanswered == 0
