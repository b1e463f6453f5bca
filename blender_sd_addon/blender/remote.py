"""Preferences for a remote backend ("Local" or "Remote (address, token)") and its "Test Connection" operator.

The settings are read by api.remote_settings(); with Remote chosen every operator and api call goes to the
server (`python -m backend serve --listen HOST:PORT` on the machine with the GPU), and its results are
fetched into the output folder, so materials are built from local files exactly as with the local worker.
"""

from __future__ import annotations

import statistics
import time

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from .. import api, protocol
from ..client import BackendClient, SDTexError
from ..remote import RemoteSettings

PING_COUNT = 5  # round trips measured for the latency
STATE = {"message": ""}  # the last test's outcome, shown under the button


class RemotePreferences:
    """Mixed into the add-on preferences (preferences.py)."""

    backend_mode: EnumProperty(
        name="Backend",
        items=(
            ("LOCAL", "Local", "Run the backend on this computer (started by the add-on)"),
            ("REMOTE", "Remote", "Use a backend served by another computer (python -m backend serve --listen)"),
        ),
        default="LOCAL",
    )
    remote_address: StringProperty(name="Address", description="HOST:PORT of the remote backend", default="")
    remote_token: StringProperty(
        name="Token", description="The token the server printed on its first start", subtype="PASSWORD"
    )
    remote_tls: BoolProperty(name="TLS", description="The server was started with --certfile/--keyfile")
    remote_cafile: StringProperty(
        name="Certificate",
        description="The server's certificate, when it is self-signed; empty trusts the system's authorities",
        subtype="FILE_PATH",
    )


def draw_preferences(prefs, layout) -> None:
    box = layout.box()
    box.row().prop(prefs, "backend_mode", expand=True)
    if prefs.backend_mode != "REMOTE":
        return
    box.prop(prefs, "remote_address")
    box.prop(prefs, "remote_token")
    row = box.row()
    row.prop(prefs, "remote_tls")
    if prefs.remote_tls:
        row.prop(prefs, "remote_cafile")
    box.operator(SDTEX_OT_test_connection.bl_idname, icon="LINKED")
    if STATE["message"]:
        box.label(text=STATE["message"], icon="INFO")


def test_connection(settings: RemoteSettings, timeout: float = 15.0) -> dict:
    """Connect, handshake, measure round trips and list the models: {"latency_ms", "devices", "models", ...}."""
    client = BackendClient.connect_remote(settings, timeout=timeout)
    try:
        start = time.perf_counter()
        handshake = client.start(timeout=timeout)
        connect = time.perf_counter() - start
        trips = []
        for _ in range(PING_COUNT):
            start = time.perf_counter()
            client.request(protocol.JOBS, timeout=timeout)
            trips.append(time.perf_counter() - start)
        listed = client.request(protocol.RUN, {"task": "list_models"}, timeout=timeout)
    finally:
        client.shutdown()
    return {
        "connect_ms": 1000 * connect,
        "latency_ms": 1000 * statistics.median(trips),
        "devices": handshake.devices,
        "loaded_model": handshake.loaded_model,
        "models": [entry["name"] for entry in listed.get("models", []) if entry.get("usable", True)],
    }


def summary(report: dict) -> str:
    models = report["models"]
    shown = ", ".join(models[:4]) + (f" and {len(models) - 4} more" if len(models) > 4 else "")
    return (
        f"Connected: {report['latency_ms']:.1f} ms per request, device {report['devices'][0]}, "
        f"{len(models)} model(s){': ' + shown if models else ''}"
    )


class SDTEX_OT_test_connection(bpy.types.Operator):
    """Connect to the remote backend and report latency, device and models"""

    bl_idname = "sdtex.test_connection"
    bl_label = "Test Connection"

    def execute(self, context):
        prefs = api.preferences()
        try:
            cafile = bpy.path.abspath(prefs.remote_cafile) if prefs.remote_cafile else ""
            settings = RemoteSettings(prefs.remote_address, prefs.remote_token, prefs.remote_tls, cafile)
            STATE["message"] = summary(test_connection(settings))
        except SDTexError as exc:
            STATE["message"] = f"Failed: {exc}"
            self.report({"ERROR"}, STATE["message"])
            return {"CANCELLED"}
        self.report({"INFO"}, STATE["message"])
        return {"FINISHED"}


classes = (SDTEX_OT_test_connection,)
