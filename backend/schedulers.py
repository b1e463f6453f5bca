"""Sampler names (protocol.SCHEDULERS) -> diffusers schedulers built from the model's own config."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sdtex_contract.protocol import INVALID_PARAMS, SCHEDULERS, ProtocolError


@dataclass(frozen=True)
class SchedulerSpec:
    cls: type[SchedulerMixin]
    display: str  # the sampler name A1111 writes into PNG metadata
    overrides: dict = field(default_factory=dict)
    call: dict = field(default_factory=dict)  # pipeline call arguments the sampler needs (they reach its step)


TRAILING = {"timestep_spacing": "trailing"}  # the last timestep first: a few-step run starts from pure noise
SCHEDULER_SPECS: dict[str, SchedulerSpec] = {
    "ddpm": SchedulerSpec(DDPMScheduler, "DDPM"),
    "ddim": SchedulerSpec(DDIMScheduler, "DDIM"),
    "pndm": SchedulerSpec(PNDMScheduler, "PLMS"),
    "euler": SchedulerSpec(EulerDiscreteScheduler, "Euler"),
    "euler_a": SchedulerSpec(EulerAncestralDiscreteScheduler, "Euler a"),
    "dpmpp_2m": SchedulerSpec(DPMSolverMultistepScheduler, "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerSpec(DPMSolverMultistepScheduler, "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "unipc": SchedulerSpec(UniPCMultistepScheduler, "UniPC"),
    "lcm": SchedulerSpec(LCMScheduler, "LCM"),
    # TCD's eta (gamma): the pipelines pass eta=0.0 to every step unless told; 0.3 is what its model cards use.
    "tcd": SchedulerSpec(TCDScheduler, "TCD", call={"eta": 0.3}),
    "ddim_trailing": SchedulerSpec(DDIMScheduler, "DDIM Trailing", TRAILING),
    "euler_a_trailing": SchedulerSpec(EulerAncestralDiscreteScheduler, "Euler a Trailing", TRAILING),
}
assert tuple(SCHEDULER_SPECS) == SCHEDULERS, "scheduler table out of sync with the protocol"


def _spec(name: str) -> SchedulerSpec:
    if name not in SCHEDULER_SPECS:
        raise ProtocolError(
            INVALID_PARAMS,
            f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}",
            {"param": "scheduler", "value": name},
        )
    return SCHEDULER_SPECS[name]


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """A fresh scheduler (they keep per-run state) from the pipeline's original scheduler config."""
    spec = _spec(name)
    return spec.cls.from_config(config, **spec.overrides)


def display_name(name: str) -> str:
    return _spec(name).display


def call_arguments(scheduler: SchedulerMixin) -> dict:
    """The pipeline call arguments a scheduler from make_scheduler needs besides the usual ones (TCD's eta)."""
    spec = next((s for s in SCHEDULER_SPECS.values() if type(scheduler) is s.cls and s.call), None)
    return dict(spec.call) if spec else {}
