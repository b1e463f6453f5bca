"""The one base of the add-on's operators (after glTF-Blender-IO): the operator turns its properties into a plain
dict, plain Python does the work, and an SDTexError becomes `self.report({'ERROR'}, message)` + {'CANCELLED'}.

JobOperator adds the fork every task operator needs: in the UI the job joins the job board and the operator returns
at once; in background mode (`blender -b`, no event loop to follow it) it blocks until the result is applied.
"""

from __future__ import annotations

import bpy

from ..client import SDTexError
from . import ui_jobs
from .ui_jobs import JobRequest
from .ui_state import STATE


class SDTexOperator:
    """Mixin for bpy.types.Operator subclasses: implement `run(context, props)`; what it returns (if anything) is
    reported as INFO."""

    errors: tuple[type[Exception], ...] = (SDTexError,)  # what becomes a report instead of a traceback
    say_errors = False  # True: the panel's message line shows the error too (the task operators)

    def execute(self, context):
        try:
            message = self.run(context, self.as_keywords())
        except self.errors as exc:
            return self.fail(str(exc))
        if message:
            self.report({"INFO"}, message)
        return {"FINISHED"}

    def run(self, context, props: dict) -> str | None:
        raise NotImplementedError

    def fail(self, message: str) -> set[str]:
        if self.say_errors:
            STATE.say(message, is_error=True)
            message = STATE.message  # in the panel's words
        self.report({"ERROR"}, message)
        return {"CANCELLED"}


class JobOperator(SDTexOperator):
    """A task operator: `request(context, props)` builds the JobRequest (plain values, checked before anything is
    sent); `started(job)` may note what the panel needs about a queued job."""

    say_errors = True

    def run(self, context, props: dict) -> str | None:
        request = self.request(context, props)
        if bpy.app.background:
            return ui_jobs.saved_message(ui_jobs.run_now(request))
        self.started(ui_jobs.start(request), props)
        return None

    def request(self, context, props: dict) -> JobRequest:
        raise NotImplementedError

    def started(self, job, props: dict) -> None:
        """A queued job (or its upload): nothing to note by default."""
