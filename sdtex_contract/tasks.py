"""The tasks: each one's spec (name, help, parameter table, result, CLI command); typed.py holds their classes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import INVALID_REQUEST, ProtocolError, invalid
from .params import PATH_MAX, READS_OR_HUB, SEAMLESS_AXES, ImageInput, Param
from .results import DownloadResult, GenerateResult, ModelList, ProjectResult, TrainResult
from .tables import (
    DEVICE_PARAMS,
    DOWNLOAD_MODEL_PARAMS,
    ESTIMATE_SAMPLING,
    ESTIMATORS,
    IMG2IMG_STRENGTH,
    INPAINT_PARAMS,
    LIST_MODELS_PARAMS,
    MAKE_SEAMLESS_PARAMS,
    MODEL_PARAMS,
    NORMAL_FORMAT,
    OUTPUT_PARAMS,
    PBR_MAP_PARAMS,
    PROJECT_PARAMS,
    PROJECT_SAMPLING,
    RESIZE_KEEP,
    SAMPLING_PARAMS,
    SEAMLESS_INPUT,
    SOURCE_PARAMS,
    TRAIN_LORA_PARAMS,
    TRAIN_MODEL_PARAMS,
    TRAVEL_PARAMS,
    TRAVEL_SAMPLING,
    UPSCALE_PARAMS,
    UPSCALE_SAMPLING,
    replaced,
)


@dataclass(frozen=True)
class TaskSpec:
    """One task as both sides know it. The worker runs it with the runner registered under its name
    (backend/tasks); the CLI makes `command` from it, the handshake lists it, the add-on validates with it."""

    name: str
    help: str
    params: tuple[Param, ...]  # without the "task" entry, which every table starts with (see table)
    result: type  # the result dataclass (from_dict reads the worker's reply)
    command: str = ""  # `python -m backend <command>`; "" when the task has none
    command_help: str = ""  # the CLI's help line when it differs from `help`

    @property
    def table(self) -> tuple[Param, ...]:
        """The full parameter table of a `run` request: the task's name, then its parameters."""
        return (Param("task", str, self.name, "What to run.", choices=(self.name,)), *self.params)


SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "txt2img",
            "Text to image: a texture from a prompt, optionally tiling, with PBR maps.",
            (
                *MODEL_PARAMS,
                *SAMPLING_PARAMS,
                Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
                *PBR_MAP_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="generate",
            command_help="Generate textures and print the written paths.",
        ),
        TaskSpec(
            "pbr",
            "PBR maps (height, normal, roughness, AO; metallic and a delit albedo from a model) of a given image.",
            (
                Param("image", ImageInput, None, "The albedo to derive maps from.", required=True),
                Param(
                    "seamless", str, "none", "Axes on which the image tiles (the maps will too).", choices=SEAMLESS_AXES
                ),
                *PBR_MAP_PARAMS,
                *DEVICE_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="pbr",
            command_help="Derive PBR maps of an image.",
        ),
        TaskSpec(
            "estimate",
            "A Marigold model's estimate of an image: depth (near = bright), normals, or albedo, roughness, metallic.",
            (
                Param("image", ImageInput, None, "The image to estimate maps of.", required=True),
                Param(
                    "estimator",
                    str,
                    "normals",
                    "Which estimate: depth, normals, or intrinsics (albedo, roughness, metallic).",
                    choices=ESTIMATORS,
                ),
                Param(
                    "model",
                    str,
                    "",
                    "Marigold model: hub id or local diffusers folder (empty: the estimator's own).",
                    max_length=PATH_MAX,
                    path=READS_OR_HUB,
                ),
                Param(
                    "seamless", str, "none", "Axes on which the image tiles (the maps will too).", choices=SEAMLESS_AXES
                ),
                *ESTIMATE_SAMPLING,
                NORMAL_FORMAT,
                *DEVICE_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="estimate",
            command_help="Estimate depth, normals or intrinsics of an image with a Marigold model.",
        ),
        TaskSpec(
            "inpaint",
            "Repaint the masked part of an image (or outpaint: extend its canvas); the rest comes back unchanged.",
            (
                *MODEL_PARAMS,
                *replaced(SAMPLING_PARAMS, SEAMLESS_INPUT),
                *replaced(SOURCE_PARAMS, RESIZE_KEEP),
                *INPAINT_PARAMS,
                Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
                *PBR_MAP_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="inpaint",
        ),
        TaskSpec(
            "make_seamless",
            "Repaint the wrap-around seams of an image so that it tiles; the rest comes back unchanged.",
            (
                *MODEL_PARAMS,
                *replaced(
                    SAMPLING_PARAMS,
                    Param("seamless", str, "xy", "Axes on which the result must tile.", choices=SEAMLESS_AXES[1:]),
                ),
                *replaced(SOURCE_PARAMS, RESIZE_KEEP),
                *MAKE_SEAMLESS_PARAMS,
                Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
                *PBR_MAP_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="make-seamless",
        ),
        TaskSpec(
            "img2img",
            "Image to image: variations of a picture, repainted as much as strength says, optionally tiling.",
            (
                *MODEL_PARAMS,
                *replaced(SAMPLING_PARAMS, SEAMLESS_INPUT),
                *SOURCE_PARAMS,
                IMG2IMG_STRENGTH,
                Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
                *PBR_MAP_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="img2img",
        ),
        TaskSpec(
            "upscale",
            "Upscale 2x or 4x: the SD x4 upscaler when given one, else tiled img2img; tiling stays tiling.",
            (
                *replaced(
                    MODEL_PARAMS,
                    Param(
                        "model",
                        str,
                        "",
                        "Model for tiled upscaling (hub id, local diffusers folder or .safetensors); not used with "
                        "upscaler_model.",
                        max_length=PATH_MAX,
                        path=READS_OR_HUB,
                    ),
                ),
                *UPSCALE_PARAMS,
                *UPSCALE_SAMPLING,
                Param("pbr", bool, False, "Also write height, normal, roughness and AO maps."),
                *PBR_MAP_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="upscale",
        ),
        TaskSpec(
            "download_model",
            "Download a hub pipeline's needed files (configs, tokenizers, safetensors weights).",
            (*DOWNLOAD_MODEL_PARAMS,),
            DownloadResult,
            command="download",
        ),
        TaskSpec(
            "list_models",
            "The models on disk: diffusers pipelines in the Hugging Face cache, and a models folder's contents.",
            (*LIST_MODELS_PARAMS,),
            ModelList,
        ),
        TaskSpec(
            "train_lora",
            "Train a LoRA (DreamBooth) on photos of a subject or a style, with samples and checkpoints.",
            (
                *TRAIN_MODEL_PARAMS,
                *TRAIN_LORA_PARAMS,
                *OUTPUT_PARAMS,
            ),
            TrainResult,
            command="train",
        ),
        TaskSpec(
            "travel",
            "Latent travel: an animated texture morphing through keyframes (prompt, seed), as an image sequence.",
            (
                *MODEL_PARAMS,
                *TRAVEL_SAMPLING,
                *TRAVEL_PARAMS,
                Param("pbr", bool, False, "Also write height, normal, roughness and AO maps of every frame."),
                *PBR_MAP_PARAMS,
                *OUTPUT_PARAMS,
            ),
            GenerateResult,
            command="travel",
        ),
        TaskSpec(
            "project",
            "Texture meshes: depth-guided views generated in turn, projected back and baked into their UV textures.",
            (
                *MODEL_PARAMS,
                *PROJECT_SAMPLING,
                *PROJECT_PARAMS,
                Param("pbr", bool, False, "Also write height, normal, roughness and AO maps of each baked texture."),
                *PBR_MAP_PARAMS,
                *OUTPUT_PARAMS,
            ),
            ProjectResult,
        ),
    )
}
TASKS = tuple(SPECS)
TASK_PARAMS: dict[str, tuple[Param, ...]] = {name: spec.table for name, spec in SPECS.items()}
TASK_HELP = {name: spec.help for name, spec in SPECS.items()}


class TaskParams:
    """Base of the parameter dataclasses in typed.py (one per task, fields and defaults from its table)."""

    TABLE: tuple[Param, ...] = ()

    @classmethod
    def from_dict(cls, params: Any):
        """Validate a params object; raise ProtocolError(INVALID_PARAMS) naming the first bad value.
        Unknown keys are ignored (they may belong to a newer client)."""
        if not isinstance(params, dict):
            raise ProtocolError(INVALID_REQUEST, f"params must be an object, got {type(params).__name__}")
        values = {}
        for p in cls.TABLE:
            if p.name in params:
                values[p.name] = p.check(params[p.name])
            elif p.required:
                raise invalid(p.name, p.accepted(), None)
            else:
                values[p.name] = list(p.default) if p.kind is list else p.default
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


GENERATE_PARAMS = TASK_PARAMS["txt2img"]


def param(name: str, task: str | None = None) -> Param:
    """The spec of one parameter by name (for CLI flags and panel limits): in `task`'s table, or in the
    first task (in TASKS order, txt2img first) that has it."""
    for table in [TASK_PARAMS[task]] if task else TASK_PARAMS.values():
        for p in table:
            if p.name == name and name != "task":
                return p
    raise KeyError(name)


def task_specs() -> dict:
    """Every task's parameter specs, as the handshake lists them."""
    return {task: {"help": TASK_HELP[task], "params": [p.to_wire() for p in TASK_PARAMS[task]]} for task in TASKS}
