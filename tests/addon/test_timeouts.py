"""Timeouts a caller gives: seconds >= 0, or None / inf for none; NaN (which compares false with every deadline and
so waited forever) and negatives are refused by name, before the worker is started or anything is sent."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from blender_sd_addon.client import BackendClient, SDTexError
from blender_sd_addon.rpc import check_timeout

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


@pytest.mark.parametrize("value", [math.nan, -1.0, -math.inf, "5", True])
def test_bad_timeouts_are_refused_naming_the_parameter(value):
    with pytest.raises(SDTexError) as info:
        check_timeout(value)
    assert str(info.value).startswith("timeout must be a number of seconds >= 0, or None or inf for no timeout")


def test_inf_and_none_mean_no_timeout_and_numbers_pass():
    assert check_timeout(None) is None and check_timeout(math.inf) is None
    assert check_timeout(0) == 0.0 and check_timeout(2.5) == 2.5


@pytest.mark.parametrize("call", ["request", "upload", "fetch", "start"])
def test_the_client_refuses_nan_before_starting_the_worker(tmp_path, call):
    client = BackendClient([sys.executable, str(FAKE_WORKER), "echo"], log_path=tmp_path / "backend.log")
    calls = {
        "request": lambda: client.request("load_model", {"model": "a"}, timeout=math.nan),
        "upload": lambda: client.upload(b"bytes", timeout=math.nan),
        "fetch": lambda: client.fetch("/some/file.png", timeout=math.nan),
        "start": lambda: client.start(timeout=math.nan),
    }
    try:
        with pytest.raises(SDTexError, match="^timeout must be"):
            calls[call]()
        assert not client.alive and not client.starting  # nothing was started, nothing sent
    finally:
        client.shutdown()


def test_wait_with_inf_waits_for_the_reply(tmp_path):
    client = BackendClient([sys.executable, str(FAKE_WORKER), "echo"], log_path=tmp_path / "backend.log")
    try:
        assert client.request("load_model", {"model": "a"}, timeout=math.inf) == {"echo": {"model": "a"}}
        with pytest.raises(SDTexError, match="^timeout must be"):
            client.wait(client.submit("load_model", {"model": "b"}), timeout=math.nan)
    finally:
        client.shutdown()
