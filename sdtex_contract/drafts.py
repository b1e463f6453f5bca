"""Drafts: a few-step picture first, then the final one with the same seed and settings (the Draft button).

Each preset is a plain table entry. `draft_params` turns a checked txt2img request into its draft: the same
request (prompt, seed, size, seamless axes, everything) with only the preset's steps, guidance and sampler, its
LoRA added to `loras`, and no PBR maps (a draft is looked at, never applied: maps would only cost time). The
worker never hears of drafts: a draft is an ordinary request.

The settings are the distilled models' own documented ones (diffusers 0.42.1):
- steps: any model, its own sampler and guidance, fewer steps.
- lcm: LCM-LoRA with LCMScheduler, 4 steps; its model card: guidance off or 1 to 2 (1: no CFG, half the cost).
- tcd: the TCD LoRA with TCDScheduler, 4 steps, guidance 0 (its eta, gamma 0.3, is the sampler's: backend).
- hyper: Hyper-SD's 8-step LoRA with DDIM on trailing timesteps, 8 steps, guidance 0.
- turbo: SD-Turbo / SDXL-Turbo models themselves: 1 step, guidance 0, trailing timesteps (a leading schedule's
  single step starts at t=1, from almost no noise).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import invalid
from .params import LORAS_MAX


@dataclass(frozen=True)
class DraftPreset:
    label: str
    help: str
    steps: int  # the draft's steps (never more than the final's)
    guidance_scale: float | None = None  # None: the final's own
    scheduler: str | None = None  # a protocol.SCHEDULERS name; None: the final's own
    lora: str = ""  # the LoRA it needs, by kind ("" none): its file or hub id comes with each request
    lora_examples: tuple[str, ...] = ()  # where people get that LoRA, per model family


DRAFT_PRESETS: dict[str, DraftPreset] = {
    "steps": DraftPreset("Fewer Steps", "Any model: its own sampler and guidance, 8 steps", 8),
    "lcm": DraftPreset(
        "LCM-LoRA", "4 steps with the LCM-LoRA and the LCM sampler", 4, 1.0, "lcm", "lcm",
        ("latent-consistency/lcm-lora-sdv1-5 (SD 1.5)", "latent-consistency/lcm-lora-sdxl (SDXL)"),
    ),
    "tcd": DraftPreset(
        "TCD LoRA", "4 steps with the TCD LoRA and the TCD sampler, no guidance", 4, 0.0, "tcd", "tcd",
        ("h1t/TCD-SD15-LoRA (SD 1.5)", "h1t/TCD-SDXL-LoRA (SDXL)"),
    ),
    "hyper": DraftPreset(
        "Hyper-SD LoRA", "8 steps with Hyper-SD's 8-step LoRA, DDIM Trailing, no guidance", 8, 0.0, "ddim_trailing",
        "hyper",
        ("Hyper-SD15-8steps-lora.safetensors (SD 1.5)", "Hyper-SDXL-8steps-lora.safetensors (SDXL), both from "
         "ByteDance/Hyper-SD"),
    ),
    "turbo": DraftPreset(
        "Turbo Model", "SD-Turbo / SDXL-Turbo models: 1 step, no guidance, Euler Ancestral Trailing", 1, 0.0,
        "euler_a_trailing",
    ),
}  # fmt: skip
DRAFT_LORA_WEIGHT = 1.0  # the weight every preset's model card loads its LoRA with


def draft_params(params: dict, preset: str, lora: str | None = None) -> dict:
    """The draft of `params`, a checked txt2img request (every field present, the seed set): the same request
    with the preset's steps (at most the final's), guidance and sampler, and (`lora`: its file, folder or hub id)
    its LoRA added to `loras`. A ProtocolError names `draft` (no such preset), `draft_lora` (a LoRA preset without
    its LoRA, or a LoRA for one that takes none), `seed` (unset: the draft and the final share it, so the caller
    picks it first) or `loras` (no room left for the preset's)."""
    spec = DRAFT_PRESETS.get(preset)
    if spec is None:
        raise invalid("draft", "one of " + ", ".join(DRAFT_PRESETS), preset)
    lora = (lora or "").strip()
    if spec.lora and not lora:
        raise invalid("draft_lora", f"the {spec.label} file, folder or hub id: {'; '.join(spec.lora_examples)}", lora)
    if lora and not spec.lora:
        raise invalid("draft_lora", f"empty: the {preset} draft takes no LoRA", lora)
    if params.get("seed") is None:
        raise invalid("seed", "a seed: the draft and the final share one, so pick it before asking for a draft", None)
    loras = list(params.get("loras", ()))
    if spec.lora and len(loras) >= LORAS_MAX:
        raise invalid("loras", f"at most {LORAS_MAX - 1} LoRAs with a {preset} draft (it adds its own)", loras)

    draft = {**params, "steps": min(spec.steps, params["steps"]), "pbr": False}
    if spec.guidance_scale is not None:
        draft["guidance_scale"] = spec.guidance_scale
    if spec.scheduler is not None:
        draft["scheduler"] = spec.scheduler
    if spec.lora:
        draft["loras"] = [*loras, {"model": lora, "weight": DRAFT_LORA_WEIGHT}]
    return draft
