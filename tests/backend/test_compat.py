"""Known-broken version pairs: read from the libraries, reported in the handshake, refused before a job queues."""

from __future__ import annotations

from importlib import metadata

import pytest
import transformers.integrations.peft

from backend import compat
from backend.worker import Worker
from sdtex_contract import protocol

REASON = "PEFT 0.21.2 is older than transformers 5.24.0 needs (0.22.0)"


@pytest.fixture(autouse=True)
def fresh_check():
    compat.unavailable.cache_clear()
    yield
    compat.unavailable.cache_clear()


def installed(monkeypatch, peft: str | None, transformers_floor: str | None = "0.22.0") -> None:
    """Pretend transformers 5.24.0 with this PEFT floor (None: a release without the constant) and this PEFT."""
    versions = {"peft": peft, "transformers": "5.24.0", "diffusers": metadata.version("diffusers")}

    def version(name: str) -> str:
        if versions.get(name) is None:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(compat.metadata, "version", version)
    if transformers_floor is None:
        monkeypatch.delattr(transformers.integrations.peft, "MIN_PEFT_VERSION")
    else:
        monkeypatch.setattr(transformers.integrations.peft, "MIN_PEFT_VERSION", transformers_floor)


def test_the_floor_is_read_from_transformers(monkeypatch):
    installed(monkeypatch, "0.21.2")
    assert compat.unavailable() == {"train_lora": REASON}

    installed(monkeypatch, "0.21.2", transformers_floor="0.21.0")  # a transformers that accepts this PEFT
    compat.unavailable.cache_clear()
    assert compat.unavailable() == {}


@pytest.mark.parametrize(
    ("peft", "floor", "expected"),
    [
        ("0.22.0", "0.22.0", {}),
        ("0.23.1", "0.22.0", {}),
        ("0.21.2", None, {}),  # no floor stated: nothing known to be broken
        (None, "0.22.0", {"train_lora": "PEFT is not installed"}),
    ],
)
def test_other_pairs(monkeypatch, peft, floor, expected):
    installed(monkeypatch, peft, floor)
    assert compat.unavailable() == expected


def test_handshake_reports_it_and_a_train_lora_request_is_refused_at_once(monkeypatch, tmp_path):
    installed(monkeypatch, "0.21.2")
    sent: list[dict] = []
    worker = Worker(sent.append)
    worker.handle(protocol.request("h", protocol.HANDSHAKE, {"protocol_version": protocol.PROTOCOL_VERSION}))
    shake = protocol.HandshakeResult.from_dict(sent.pop()["result"])
    assert shake.unavailable == {"train_lora": REASON}

    photos = tmp_path / "photos"
    photos.mkdir()
    params = {"task": "train_lora", "model": "tiny", "photos_dir": str(photos), "instance_prompt": "sks wood",
              "output_dir": str(tmp_path / "out")}  # fmt: skip
    assert worker.receive(protocol.request("t", protocol.RUN, params)) is None  # answered, not queued
    error = sent.pop()["error"]
    assert error["code"] == protocol.INVALID_PARAMS and error["data"]["param"] == "task"
    assert f"task train_lora is unavailable in this backend: {REASON}" in error["message"]
    assert worker.job_list() == [] and not sent


def test_the_environment_under_test_has_no_known_break():
    """The locked versions work together; under `make test-latest` this names a new break in plain words."""
    assert compat.unavailable() == {}
