"""Preferences for a remote backend ("Local" or "Remote (address, token)") and its "Test Connection" operator.

The settings are read by session.remote_settings(); with Remote chosen every operator and api call goes to the
server (`python -m backend serve --listen HOST:PORT` on the machine with the GPU), and its results are
fetched into the output folder, so materials are built from local files exactly as with the local worker.
"""

from __future__ import annotations

import statistics
import time

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from .. import readiness
from ..client import BackendClient, SDTexError
from ..contract import protocol
from ..remote import RemoteSettings
from . import session
from .ui_state import STATE as ui

PING_COUNT = 5  # round trips measured for the latency
STATE = {"message": "", "error": False}  # the last test's outcome, shown under the button


def last_error() -> str:
    """The last Test Connection's failure ("" after a success, or once a setting it was about changed)."""
    return STATE["message"] if STATE["error"] else ""


def _setting_changed(prefs, context) -> None:
    """A remote setting changed: what was said about the previous one is stale (a wrong-token error must not stay
    under Local, nor under the corrected token)."""
    STATE["message"], STATE["error"] = "", False
    if ui.is_error:  # the last Generate's error was about the backend just left
        ui.say("")
    if readiness.message_kind(ui.backend_message) == readiness.ERROR:
        ui.backend_message = ""
    ui.readiness = None


class RemotePreferences:
    """Mixed into the add-on preferences (preferences.py)."""

    backend_mode: EnumProperty(
        name="Backend",
        items=(
            ("LOCAL", "Local", "Run the backend on this computer (started by the add-on)"),
            ("REMOTE", "Remote", "Use a backend served by another computer (python -m backend serve --listen)"),
        ),
        default="LOCAL",
        update=_setting_changed,
    )
    remote_address: StringProperty(
        name="Address", description="HOST:PORT of the remote backend", default="", update=_setting_changed
    )
    remote_token: StringProperty(
        name="Token",
        description="The token the server printed on its first start",
        subtype="PASSWORD",
        update=_setting_changed,
    )
    remote_tls: BoolProperty(
        name="TLS", description="The server was started with --certfile/--keyfile", update=_setting_changed
    )
    remote_cafile: StringProperty(
        name="Certificate",
        description="The server's certificate, when it is self-signed; empty trusts the system's authorities",
        subtype="FILE_PATH",
        update=_setting_changed,
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
        box.label(text=STATE["message"], icon="ERROR" if STATE["error"] else "CHECKMARK")


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
        prefs = session.preferences()
        try:
            cafile = bpy.path.abspath(prefs.remote_cafile) if prefs.remote_cafile else ""
            settings = RemoteSettings(prefs.remote_address, prefs.remote_token, prefs.remote_tls, cafile)
            STATE["message"], STATE["error"] = summary(test_connection(settings)), False
        except SDTexError as exc:
            STATE["message"], STATE["error"] = f"Failed: {exc}", True
            self.report({"ERROR"}, STATE["message"])
            return {"CANCELLED"}
        self.report({"INFO"}, STATE["message"])
        return {"FINISHED"}


classes = (SDTEX_OT_test_connection,)
