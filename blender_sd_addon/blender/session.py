"""The add-on's session in Blender: its preferences, its data folder, the backend client in use (local worker
or remote server) and the output folder. api.py, the operators and the panels all read these from here."""

from __future__ import annotations

import os
from pathlib import Path

import bpy

from .. import paths
from ..client import BackendClient, SDTexError
from ..remote import RemoteSettings

ADDON_ID = __package__.rpartition(".")[0]  # the add-on's package: blender_sd_addon, or bl_ext.<repo>.blender_sd_addon
# Preferences passed with every request (names match protocol parameters and the preference properties).
GPU_SETTINGS = ("cpu_offload", "channels_last", "compile", "attention_slicing")
BACKEND_SETTINGS = ("device", "dtype", *GPU_SETTINGS, "vae_tiling", "allow_pickle")
LOAD_MODEL_SETTINGS = ("model", "device", "dtype", *GPU_SETTINGS, "allow_pickle")

_client: BackendClient | None = None
_remote: RemoteSettings | None = None  # configure_remote()


def preferences():
    addon = bpy.context.preferences.addons.get(ADDON_ID)
    if addon is None:
        raise SDTexError(f"The SD Textures add-on is not enabled: call addon_utils.enable({ADDON_ID!r}) first")
    return addon.preferences


def user_data_dir() -> Path:
    try:  # Blender 4.2+ extension
        return Path(bpy.utils.extension_path_user(ADDON_ID, create=True))
    except (AttributeError, ValueError):  # older Blender, or installed as a legacy add-on
        return Path(bpy.utils.user_resource("DATAFILES", path="sd_textures", create=True))


def configure_remote(address: str | None, token: str = "", *, tls: bool = False, cafile: str = "") -> None:
    """Use the backend served by `python -m backend serve --listen HOST:PORT` on another machine from now on
    (None: back to the preferences). Every call works as with the local worker: inputs are uploaded, result
    files are fetched into the output folder. cafile: the server's certificate when it is self-signed (tls).
    Without code: $SDTEX_REMOTE=HOST:PORT, $SDTEX_REMOTE_TOKEN, $SDTEX_REMOTE_TLS=1, $SDTEX_REMOTE_CAFILE, or
    the preferences' Backend: Remote."""
    global _remote
    _remote = RemoteSettings(address, token, tls, cafile) if address else None


def remote_settings() -> RemoteSettings | None:
    """The remote backend to use: configure_remote(), else the environment, else the preferences; or None."""
    if _remote is not None:
        return _remote
    if (from_env := RemoteSettings.from_env()) is not None:
        return from_env
    prefs = preferences()
    if getattr(prefs, "backend_mode", "LOCAL") != "REMOTE":
        return None
    cafile = bpy.path.abspath(prefs.remote_cafile) if prefs.remote_cafile else ""
    return RemoteSettings(prefs.remote_address, prefs.remote_token, prefs.remote_tls, cafile)


def get_client() -> BackendClient:
    """The client for the configured backend: remote (remote_settings) or the local interpreter's worker; a new
    one when the setting changed."""
    global _client
    if (remote := remote_settings()) is not None:
        if _client is None or _client.remote != remote:
            shutdown_backend()
            _client = BackendClient.connect_remote(remote)
        return _client
    data = user_data_dir()
    python = paths.find_backend_python(bpy.path.abspath(preferences().backend_python), data)
    command = paths.worker_command(python)
    if _client is None or _client.remote is not None or _client.command != command:
        # Jobs keep the client that took them, so they finish (or fail) on the old worker by themselves.
        shutdown_backend()
        _client = BackendClient(command, log_path=data / "backend.log")
    return _client


def current_client() -> BackendClient | None:
    return _client


def shutdown_backend() -> None:
    """Stop the backend worker (it starts again on the next request)."""
    if _client is not None:
        _client.shutdown()


def load_model_params() -> dict:
    prefs = preferences()
    params = {name: getattr(prefs, name) for name in LOAD_MODEL_SETTINGS}
    params["model"] = bpy.path.abspath(params["model"])
    return params


def output_folder(output_dir: str | None) -> str:
    """The absolute folder files go to: `output_dir`, or the preferences' output folder when None."""
    if output_dir:
        return os.path.abspath(bpy.path.abspath(output_dir))
    return str(paths.resolve_output_dir(preferences().output_folder, bpy.data.filepath, user_data_dir()))
