"""Draft, then final: a few-step picture shown while the full one runs with the same seed and settings.

The draft goes into the Image Editors that show the live preview (empty ones), like a final image; it is never
applied and never recorded in the history (its file, with its settings in the PNG, stays in the output folder).
The final replaces it there when it arrives, and only the final goes on the objects and into the history.

The chain is the job board's (jobs.FollowUp): the final is submitted when the draft is done, so cancelling the
draft (or every job) stops both, and the final's row cancels the final.
"""

from __future__ import annotations

import secrets

import bpy

from ..client import SDTexError
from ..contract import drafts, protocol
from ..jobs import DONE, FollowUp, Job
from . import materials, preview, session, tasks, ui_jobs
from .results import TextureResult, finish, written_files
from .ui_jobs import JobRequest
from .ui_state import STATE, Target

DRAFT, FINAL = "draft", "draft_final"  # the two jobs' target kinds (ui_jobs.FINISHERS)


def pick_seed(seed: int | None) -> int:
    """The seed both jobs share: the one given, or one picked here, once."""
    return secrets.randbelow(protocol.SEED_MAX + 1) if seed is None else seed


def preferences_lora(preset: str) -> str:
    """The LoRA the preferences hold for a preset's kind ("" for presets that take none); SDTexError when unset."""
    spec = drafts.DRAFT_PRESETS.get(preset)
    if spec is None or not spec.lora:
        return ""
    lora = getattr(session.preferences(), f"{spec.lora}_lora").strip()
    if not lora:
        examples = "; ".join(spec.lora_examples)
        raise SDTexError(
            f"The {preset} draft needs its LoRA: set Preferences > Draft LoRAs > {spec.label} ({examples})"
        )
    return lora


def draft_request(final: JobRequest, preset: str, lora: str | None) -> JobRequest:
    """The draft of a checked txt2img request (drafts.draft_params, checked again): it applies to nothing."""
    lora = bpy.path.abspath(lora) if lora and not protocol.is_hub_id(lora) else lora  # "//": beside the .blend
    try:
        params = drafts.draft_params(final.params, preset, lora)
        checked = protocol.PARAMS_CLASSES[final.task].from_dict(params).to_dict()
    except protocol.ProtocolError as exc:
        raise SDTexError(exc.message) from None
    return JobRequest(final.task, checked, [], None, False)


def start(draft: JobRequest, final: JobRequest) -> Job:
    """Queue the draft on the UI's board with the final as its follow-up; returns at once."""
    then = FollowUp(final.task, final.params)
    names = tuple(obj.name for obj in final.meshes)
    final_target = Target(names, final.options, final.apply, kind=FINAL)
    job = STATE.board.submit(session.get_client(), draft.task, draft.params, then)
    STATE.targets[job.request_id] = Target(names, None, False, kind=DRAFT, request=(then, final_target))
    ui_jobs.follow()
    return job


def run_now(draft: JobRequest, final: JobRequest, timeout: float | None = None) -> tuple[TextureResult, TextureResult]:
    """Run the draft, then the final, each waited for (background mode, scripts): (draft, final) results."""
    shown = loaded(tasks.run(draft.params, draft.task, timeout))
    result = tasks.run(final.params, final.task, timeout)
    return shown, finish(result, final.meshes, final.options, apply=final.apply and bool(final.meshes))


def loaded(result: protocol.GenerateResult) -> TextureResult:
    """A draft's images (and maps) loaded, nothing applied or recorded."""
    images = [bpy.data.images.load(i.path, check_existing=True) for i in result.images]
    maps = [{kind: materials.load_image(path, kind) for kind, path in i.maps.items()} for i in result.images]
    return TextureResult(images, maps, [], written_files(result), result.seed, result)


def _draft_finished(job: Job, target: Target) -> None:
    """Show the draft and hand the final its target (the board has submitted it when the draft was done)."""
    then, final_target = target.request
    if job.state != DONE:  # failed or cancelled: the final never starts
        ui_jobs.finish_texture_job(job, target)  # says which
        return
    if then.job is None:  # done, but Cancel was pressed before the answer came
        STATE.say("Cancelled")
        return
    draft = loaded(job.result)
    preview.hand_over(draft.images[0])
    final_target.request = draft.images[0].name
    STATE.targets[then.job.request_id] = final_target
    STATE.say(f"Draft shown ({job.result.params.get('steps')} steps); the final follows (seed {job.result.seed})")


def _final_finished(job: Job, target: Target) -> None:
    """The usual end (applied, recorded), and the final in the editors that still show its draft."""
    ui_jobs.finish_texture_job(job, target)
    if job.state == DONE and job.result is not None:
        ui_jobs.show_result(target.request, bpy.data.images.load(job.result.images[0].path, check_existing=True))


ui_jobs.FINISHERS[DRAFT] = _draft_finished
ui_jobs.FINISHERS[FINAL] = _final_finished
