"""Errors next to the control that started them: an operator with its own panel keeps its error there (below its
button), not on the main panel's line under Generate, far from where the artist clicked."""

from __future__ import annotations

import re

from .. import messages
from ..contract import protocol
from .properties import LABELS

MESSAGES: dict[str, str] = {}  # operator bl_idname -> its last error, in the panel's words
# Parameters with choices, by name: their values are words of the protocol ("rect") that the menus call otherwise.
CHOICES = {p.name: p.choices for table in protocol.TASK_PARAMS.values() for p in table if p.choices}
_LIST = r"'?\w+'?(?:(?:, | or )'?\w+'?)*"  # "image", "alpha, rect or none"


def in_ui_words(message: str) -> str:
    """A parameter with choices and the values named right after it ("mask_from is image", "set mask_from to
    alpha, rect or none") as the panel shows them ("Mask From is Image", "... to Alpha, Rectangle or Off")."""
    for name, choices in CHOICES.items():
        label = messages.LABELS.get(name) or name.replace("_", " ").title()
        linking = "( is | to )" if "_" not in name else "( is | to )?"  # a plain word ("export") only before a value

        def clause(match: re.Match, label: str = label, choices: tuple = choices) -> str:
            values = re.sub(r"'?\b(\w+)\b'?", lambda v: _choice_label(v, choices), match[2] or "")
            return f"{label}{match[1] or ''}{values}"

        message = re.sub(rf"\b{name}\b{linking}({_LIST})?", clause, message)
    return message


def _choice_label(value: re.Match, choices: tuple) -> str:
    word = value[1]
    return LABELS.get(word, word.replace("_", " ").title()) if word in choices else value[0]


class OwnMessage:
    """Mixin, before SDTexOperator or JobOperator: the operator's errors go to MESSAGES[bl_idname]; a new run
    clears its line. Its panel draws the line with panels.draw_own_message."""

    say_errors = False

    @classmethod
    def idname(cls) -> str:
        """ "sdtex.travel", as panels name the operator (an instance's bl_idname reads "SDTEX_OT_travel")."""
        return cls.__dict__.get("bl_idname") or next(c.bl_idname for c in cls.__mro__ if "bl_idname" in c.__dict__)

    def run(self, context, props: dict):
        MESSAGES.pop(self.idname(), None)
        return super().run(context, props)

    def fail(self, message: str) -> set[str]:
        print(f"SD Textures: {message}")  # the precise text; the panel shows it in its own words
        MESSAGES[self.idname()] = in_ui_words(messages.readable(message))
        self.report({"ERROR"}, MESSAGES[self.idname()])
        return {"CANCELLED"}
