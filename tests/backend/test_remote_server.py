"""The TCP server (`python -m backend serve --listen`): token, TLS, limits against hostile clients, and the
policy that keeps remote clients off the server's paths. Over loopback, with the tiny model; the server
uses TLS with a self-signed certificate made here (plain TCP: the add-on's remote test and benchmark)."""

from __future__ import annotations

import hashlib
import json
import stat
import time
from pathlib import Path

import PIL.Image
import pytest
from remote_server_process import Raw, ServerProcess, self_signed

from backend.remote_policy import Policy
from backend.server_token import is_loopback, load_or_create_token, token_matches
from blender_sd_addon.client import BackendError
from sdtex_contract import protocol

MAX_MESSAGE = 1 << 20


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> Path:
    return tiny_model_dir.parent


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(models: Path, certificate: tuple[Path, Path], tmp_path_factory):
    process = ServerProcess(
        tmp_path_factory.mktemp("server-config"),
        "--models-dir", str(models), "--max-message", str(MAX_MESSAGE), "--idle-timeout", "3",
        "--max-requests", "40", "--max-connections", "6",
        certificate=certificate,
    )  # fmt: skip
    yield process
    process.close()


def connect(server: ServerProcess) -> Raw:
    return Raw(server.port, server.cafile)


def job(tiny_model_dir: Path, output_dir: Path, seed: int = 7) -> dict:
    return {
        "task": "txt2img",
        "model": str(tiny_model_dir),
        "prompt": "cracked clay",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": seed,
        "output_dir": str(output_dir),
    }


def server_files(server: ServerProcess) -> set[str]:
    return {path.name for path in (server.config / "outputs").iterdir()}


def test_token_is_made_once_private_and_printed(server: ServerProcess):
    mode = (server.config / "server-token").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert server.printed_token == server.token and len(server.token) >= 32
    assert load_or_create_token(server.config) == (server.token, False)  # a second start keeps it


def test_without_or_with_a_wrong_token_nothing_runs(server: ServerProcess, tiny_model_dir: Path, tmp_path: Path):
    before = server_files(server)
    for token in (None, "", server.token[:-1] + ("x" if server.token[-1] != "x" else "y")):
        raw = connect(server)
        reply = raw.handshake(token)
        assert reply["error"]["code"] == "unauthorized", reply
        assert raw.closed_by_server()
    raw = connect(server)  # a job as the first message, token or not, is refused before it is looked at
    raw.send(protocol.request("g", protocol.RUN, job(tiny_model_dir, tmp_path) | {"token": server.token}))
    assert raw.receive()["error"]["code"] == "unauthorized"
    assert raw.closed_by_server()
    assert server_files(server) == before and not any(tmp_path.iterdir())


def test_token_compare():
    assert token_matches("s3cret-token", "s3cret-token")
    assert not token_matches("s3cret-token", "s3cret-tokem")
    assert not token_matches("s3cret-token", None)
    assert not token_matches("s3cret-token", "s3cret-token\u00e9")


def test_generate_brings_the_png_bytes_and_metadata(server: ServerProcess, tiny_model_dir: Path, tmp_path: Path):
    client = server.client()
    try:
        events: list[dict] = []
        reply = client.wait(client.submit(protocol.RUN, job(tiny_model_dir, tmp_path)), events.append, timeout=120)
        result = protocol.GenerateResult.from_dict(client.result(reply))
    finally:
        client.shutdown()
    path = Path(result.images[0].path)
    assert path.parent == tmp_path  # written here, where a local worker would have written it
    announced = [e["data"] for e in events if e.get("event") == protocol.EVENT_ARTIFACT]
    assert [a["path"] for a in announced] == [str(path)] == [a["path"] for a in result.artifacts]
    original = server.config / "outputs" / path.name
    assert path.read_bytes() == original.read_bytes()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == announced[0]["sha256"]
    with PIL.Image.open(path) as image:
        settings = json.loads(image.text["sdtex"])
        assert image.size == (64, 64)
    assert settings["seed"] == 7 and settings["params"]["prompt"] == "cracked clay"
    assert "Seed: 7" in image.text["parameters"]


def test_a_remote_client_names_no_server_path(server: ServerProcess, tiny_model_dir: Path, tmp_path: Path):
    raw = connect(server)
    assert "result" in raw.handshake(server.token)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model_index.json").write_text("{}")
    cases = {
        "output_dir": job(tiny_model_dir, tmp_path),  # the client's folder: refused, not silently replaced
        "model": job(tiny_model_dir, tmp_path) | {"model": str(outside), "output_dir": ""},
        "allow_pickle": job(tiny_model_dir, tmp_path) | {"allow_pickle": True, "output_dir": ""},
        "image.path": {"task": "pbr", "image": {"path": str(tiny_model_dir / "model_index.json")}},
        "local_dir": {"task": "download_model", "model": "a/b", "local_dir": str(tmp_path)},
    }
    for i, (param, params) in enumerate(cases.items()):
        raw.send(protocol.request(f"p{i}", protocol.RUN, params))
        error = raw.terminal(f"p{i}")["error"]
        assert (error["code"], error["data"]["param"]) == ("invalid_params", param), error
    raw.send(protocol.request("m", protocol.LOAD_MODEL, {"model": "../" + tiny_model_dir.name}))
    assert raw.terminal("m")["error"]["data"]["param"] == "model"
    assert {p.name for p in tmp_path.iterdir()} == {"elsewhere"}  # nothing written to the client's folder
    raw.close()


def test_policy_keeps_models_inside_the_allowed_folders(tmp_path: Path):
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (models / "link").symlink_to(tmp_path / "secret")
    policy = Policy(tmp_path / "out", (models,))
    model = protocol.READS_OR_HUB
    assert policy.path(model, "model", str(models / "tiny")) == str(models / "tiny")
    assert policy.path(model, "model", "tiny") == str(models / "tiny")  # a name inside the folder
    assert policy.path(model, "model", "stabilityai/sd-turbo") == "stabilityai/sd-turbo"  # a hub id
    for bad in (str(models / "link"), "../secret", "~/x", str(models / ".." / "secret"), "link", "C:\\models\\x"):
        with pytest.raises(protocol.ProtocolError, match="model is refused") as info:
            policy.path(model, "model", bad)
        assert info.value.data["param"] == "model"
    checked = policy.check(protocol.RUN, {"task": "txt2img", "prompt": "/imagine ../stone", "model": "tiny"})
    assert checked["output_dir"] == str(tmp_path / "out") and checked["prompt"] == "/imagine ../stone"
    with pytest.raises(protocol.ProtocolError) as info:
        policy.check(protocol.RUN, {"task": "txt2img", "loras": [{"model": "/etc", "weight": 1.0}]})
    assert info.value.data["param"] == "loras[0].model"


def test_garbage_and_idle_clients_do_not_stop_a_job(server: ServerProcess, tiny_model_dir: Path, tmp_path: Path):
    client = server.client()
    idle = connect(server)
    assert "result" in idle.handshake(server.token)
    silent = connect(server)  # connected, never says anything
    try:
        request_id = client.submit(protocol.RUN, job(tiny_model_dir, tmp_path, seed=11) | {"steps": 4})
        garbage = connect(server)
        assert "result" in garbage.handshake(server.token)
        sent = 0
        try:  # 8x the message limit, no newline: closed once the limit is passed
            while sent < 8 * MAX_MESSAGE:
                garbage.sock.sendall(b"\x00garbage" * 8192)
                sent += 8 * 8192
        except OSError:
            pass
        assert sent < 8 * MAX_MESSAGE or garbage.closed_by_server()
        result = client.result(client.wait(request_id, timeout=120))
        assert Path(result["images"][0]["path"]).is_file()
        started = time.monotonic()
        assert idle.closed_by_server() and time.monotonic() - started < 10  # --idle-timeout 3
    finally:
        client.shutdown()
        silent.close()


def test_an_over_long_line_is_answered_and_closes_the_connection(server: ServerProcess):
    raw = connect(server)
    assert "result" in raw.handshake(server.token)
    raw.sock.sendall(b'{"id": "x", "method": "jobs", "pad": "' + b"y" * MAX_MESSAGE + b'"}\n')
    raw.send(protocol.request("after", protocol.JOBS))  # never read: the connection ends with the long line
    error = raw.receive()["error"]
    assert error["code"] == "parse_error" and f"longer than {MAX_MESSAGE} bytes" in error["message"]
    assert raw.receive() is None


def test_before_the_handshake_a_line_may_be_64_kib(server: ServerProcess):
    stranger = connect(server)
    stranger.sock.sendall(b"x" * (65 * 2**10))  # far below --max-message, no newline, no token
    error = stranger.receive()["error"]
    assert error["code"] == "parse_error" and "longer than 65536 bytes" in error["message"]
    assert stranger.receive() is None


def test_request_and_connection_limits(server: ServerProcess):
    raw = connect(server)
    assert "result" in raw.handshake(server.token)
    for i in range(39):
        raw.send(protocol.request(f"j{i}", protocol.JOBS))
    raw.send(protocol.request("last", protocol.JOBS))
    assert raw.terminal("j38")["result"] == {"jobs": []}
    assert raw.terminal("last")["error"]["code"] == "too_many_requests"
    assert raw.closed_by_server()

    time.sleep(0.5)  # the earlier tests' connections are gone
    held = [connect(server) for _ in range(6)]
    for connection in held:
        assert "result" in connection.handshake(server.token)
    refused = connect(server)  # a seventh token holder: the server already serves its 6 (--max-connections)
    assert refused.handshake(server.token)["error"]["code"] == "too_many_requests"
    assert refused.closed_by_server()
    for connection in held:
        connection.close()
    time.sleep(1.5)
    again = connect(server)
    assert "result" in again.handshake(server.token)
    again.close()


def test_tls_with_a_self_signed_certificate(server: ServerProcess, models: Path):
    client = server.client()  # trusting the server's own certificate
    listed = client.request(protocol.RUN, {"task": "list_models", "include_cache": False}, timeout=60)
    assert [entry["name"] for entry in listed["models"]] == sorted(p.name for p in models.iterdir())
    client.shutdown()
    untrusted = server.client(cafile="")  # the system's authorities do not know this certificate
    with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.start(timeout=30)
    plain = Raw(server.port)  # no TLS: the server's TLS handshake fails and the connection ends
    plain.send(protocol.request("h", protocol.HANDSHAKE, {"protocol_version": 2, "token": server.token}))
    assert plain.closed_by_server()


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")


def test_non_loopback_without_token_is_refused(tmp_path: Path, capsys):
    from backend.__main__ import main

    assert main(["serve", "--listen", "0.0.0.0:0", "--no-token", "--config-dir", str(tmp_path)]) == 2
    assert "--no-token is only for loopback" in capsys.readouterr().err
