"""Errors in an artist's words: parameter names become the panel's labels, with what to do.

Blender-free. The protocol's precise message stays in the console and the log; the panel shows this.
"""

from __future__ import annotations

import re

from .contract import model_catalog, protocol

# Panel labels of parameters whose name is not their label once title-cased.
LABELS = {
    "guidance_scale": "Guidance",
    "batch_size": "Batch",
    "negative_prompt": "Negative prompt",
    "pbr": "PBR Maps",
    "ao_strength": "AO Strength",
    "dtype": "Precision",
    "cpu_offload": "CPU Offload",
    "compile": "Compile U-Net",
    "vae_tiling": "VAE Tiling",
    "output_dir": "Output Folder (Preferences)",
    "model": "Model",
}
_PARAM_ERROR = re.compile(
    r"^(?P<name>[a-z_]+)(?P<index>\[\d+\](?:\.[a-z_]+)?)? must be (?P<accepted>.+?), got (?P<got>.*)$"
)


def label(name: str) -> str:
    return LABELS.get(name, name.replace("_", " ").capitalize())


def suggestion(name: str, got: str) -> str:
    """A value to try, for size errors people hit most ("try 512")."""
    spec = _spec(name)
    if spec is None or spec.kind is not int or not spec.range or not spec.range.multiple:
        return ""
    try:
        value = int(float(got))
    except ValueError:
        return ""
    r = spec.range
    nearest = min(max(round(value / r.multiple) * r.multiple, int(r.low)), int(r.high))
    return f": try {nearest}"


def _spec(name: str) -> protocol.Param | None:
    try:
        return protocol.param(name)
    except KeyError:
        return None


def readable(message: str) -> str:
    """ "width must be an integer from 64 to 2048 in multiples of 8, got 500" ->
    "Width must be an integer from 64 to 2048 in multiples of 8 (you gave 500): try 504"."""
    first, _, rest = message.partition("\n")
    match = _PARAM_ERROR.match(first)
    if not match or _spec(match["name"]) is None:
        return message
    name, got = match["name"], match["got"]
    if match["accepted"] == "a non-empty string":
        text = f"{label(name)} is empty: fill it in"
    else:
        text = f"{label(name)}{match['index'] or ''} must be {match['accepted']} (you gave {got})"
        text += suggestion(name, got)
    return text + (f"\n{rest}" if rest else "")


def parameter_of(message: str) -> str:
    """The parameter a "<name> must be ..." error is about ("" for any other message)."""
    match = _PARAM_ERROR.match(message.partition("\n")[0])
    return match["name"] if match and not match["index"] and _spec(match["name"]) else ""


def source_label(source: str) -> str:
    """Where a map came from, in a node's label: "classical" -> "derived" (filters on the albedo);
    "model:prs-eth/marigold-normals-v1-1" -> "Marigold"; another model by its short name."""
    if source == "classical":
        return "derived"
    if not source.startswith("model:"):
        return source
    model = source.removeprefix("model:")
    return "Marigold" if "marigold" in model.lower() else model_catalog.short_name(model)


def map_sources_line(sources: dict[str, str]) -> str:
    """A record's map sources on one line: "Normal: Marigold · Roughness: derived" (albedo: "Albedo: delit ...")."""
    names = {"ao": "AO", "albedo": "Albedo (delit)"}
    return " · ".join(f"{names.get(kind, kind.title())}: {source_label(src)}" for kind, src in sources.items())
