"""The panel's backend and model lines: readiness.check on facts gathered here (reused briefly, panels redraw
often and the check looks at files)."""

from __future__ import annotations

import time

import bpy

from .. import readiness
from ..contract import model_catalog
from . import install_ops, session, tasks
from . import remote as remote_ops
from .ui_state import STATE

FACTS_TTL = 0.5  # seconds a readiness check is reused: panels redraw often, the check looks at files


def scene_model(context) -> str:
    """The model in effect: the scene's own, else the preferences'."""
    own = context.scene.sdtex.model
    return bpy.path.abspath(own) if own else session.load_model_params()["model"]


def check_readiness(context) -> readiness.Readiness:
    """The panel's backend and model lines (readiness.check on facts gathered here, reused briefly)."""
    now = time.monotonic()
    if STATE.readiness and now - STATE.readiness[0] < FACTS_TTL:
        return STATE.readiness[1]
    remote = session.remote_settings()
    client, download = session.current_client(), STATE.download_job()
    shake = client.handshake if client and client.alive else None
    model = scene_model(context)
    facts = readiness.Facts(
        **install_ops.interpreter_facts(remote is not None),
        **install_ops.install_facts(),
        remote_error=remote_ops.last_error(),
        running=bool(client and client.alive),
        starting=bool(client and client.starting),
        # A start that failed before any worker existed (no interpreter) is that line's business, not this one's.
        worker_error=STATE.backend_message if client and STATE.backend_message.startswith("error") else "",
        device="/".join(shake.devices[:1]) if shake else "",
        torch_version=shake.torch_version if shake else "",
        remote=remote.address if remote else "",
        model=model,
        model_state="remote" if remote else model_catalog.local_status(model),
        downloading=download is not None,
        download_progress=download.fraction if download else 0.0,
        download_text=download.status_text if download else "",
        download_model=download.params.get("model", "") if download else "",
        estimators=tasks.estimator_facts(context.scene.sdtex, remote is not None) if context.scene.sdtex.pbr else (),
        **tasks.preview_decoder_facts(remote is not None),
    )
    STATE.readiness = (now, readiness.check(facts))
    return STATE.readiness[1]
