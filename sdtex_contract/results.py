"""Events streamed during a job and the results that end it, as dataclasses (unknown fields ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class ProgressEvent:
    step: int  # 1-based steps done
    total: int
    elapsed: float  # seconds since denoising started
    image_index: int = 0  # reserved for tasks that run several passes; travel: the frame (0-based)
    frames: int = 0  # travel: frames in the sequence ("frame image_index + 1 of frames, step of total")


@dataclass
class PreviewEvent:
    step: int
    width: int
    height: int
    rgb: str  # base64 of width*height*3 uint8 bytes, rows top to bottom
    decoder: str = ""  # the preview_decoder that decoded it; "": the latent approximation
    note: str = ""  # once per job: why previews are approximate although a preview_decoder was set


@dataclass
class Artifact:
    """A file a job made, announced once it is complete under its final name."""

    path: str  # absolute path on the worker's machine (fetch it with `fetch` when remote)
    kind: str  # "image" (an albedo), "map" (a PBR map), later "frame", "view", "sample", "checkpoint"
    size: int  # bytes
    sha256: str
    index: int = 0  # which image of the job it belongs to
    role: str = "albedo"  # "albedo" | "height" | "normal" | "roughness" | "ao" | ...


@dataclass
class ImageRecord:
    path: str  # absolute path of the PNG (albedo; for the pbr task, the source image's path or "")
    seed: int | None
    maps: dict[str, str] = field(default_factory=dict)  # "height" | "normal" | "roughness" | "ao" | ... -> path
    # How each map was made: "classical" (filters on the albedo) or "model:<estimator model>"; {} from old workers.
    map_sources: dict[str, str] = field(default_factory=dict)


IMAGE_FIELDS = ("path", "seed", "maps", "map_sources")


@dataclass
class GenerateResult:
    """The result of every image task (txt2img, pbr): images with their maps, and how they were made."""

    images: list[ImageRecord]
    seed: int | None  # seed of the first image; image i uses seed + i (None when nothing was sampled)
    width: int
    height: int
    model: str
    seamless: str
    timings: dict[str, float]  # load, encode, denoise, decode, save, total (seconds)
    params: dict  # the full validated parameters
    task: str = "txt2img"
    artifacts: list[dict] = field(default_factory=list)  # every Artifact of the job, in order

    @classmethod
    def from_dict(cls, data: dict) -> GenerateResult:
        images = [ImageRecord(**{k: v for k, v in i.items() if k in IMAGE_FIELDS}) for i in data["images"]]
        known = {f.name for f in fields(cls)} - {"images"}
        return cls(images=images, **{k: v for k, v in data.items() if k in known})


@dataclass
class ViewRecord:
    """One view of a `project` job: what it generated and on what, each file on disk (paths "" when the view
    had nothing left to paint and was skipped)."""

    index: int
    seed: int | None
    image: str  # the generated picture (after paste-back of what was already painted)
    mask: str  # white = painted by this view
    depth: str  # the depth conditioning (near = bright)
    normal: str  # camera-space normals as colours
    new_pixels: int  # pixels of surface this view painted
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # render, generate, bake (seconds)


@dataclass
class ProjectResult(GenerateResult):
    """The `project` task's result: `images` holds one baked texture per object (object_index order)."""

    task: str = "project"
    texture_size: int = 0
    coverage: list[float] = field(default_factory=list)  # per object: fraction of its texels some view saw
    unseen: list[int] = field(default_factory=list)  # objects no view saw (coverage 0): a flat grey texture
    views: list[dict] = field(default_factory=list)  # ViewRecord per view, in order
    warnings: list[str] = field(default_factory=list)


@dataclass
class DownloadProgress:
    """download_model's `download` event: how far the download is."""

    bytes_done: int
    bytes_total: int  # what this job fetches; files already on disk are not counted
    files_done: int
    files_total: int
    speed: float  # bytes per second over the last few seconds
    elapsed: float  # seconds since the transfer began


def _from_known(cls: type, data: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class DownloadResult:
    """download_model's result."""

    model: str  # what to pass as `model` from now on: the hub id (cache) or the folder (local_dir)
    path: str  # the folder holding the files (the cache snapshot, or local_dir)
    revision: str  # the commit downloaded
    files: list[str]  # repository paths of the files the model needs, all on disk now
    size: int  # bytes of those files
    downloaded: int  # bytes this job fetched (0 when everything was there)
    family: str  # "sd" | "sdxl"
    variant: str  # "fp16" when any weights are the fp16 files, else "fp32"
    seconds: float
    task: str = "download_model"
    artifacts: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> DownloadResult:
        return _from_known(cls, data)


@dataclass
class ModelEntry:
    """One model on disk, as list_models reports it."""

    model: str  # the value for `model`: hub id, folder or file path
    kind: str  # "hub" (Hugging Face cache) | "folder" (diffusers folder) | "single_file"
    name: str  # for people: the hub id or the file/folder name
    path: str  # where it is on disk
    size: int  # bytes on disk
    family: str = ""  # "sd" | "sdxl"; "" when not usable
    base: str = ""  # "sd1" | "sd2" | "sdxl": the architecture it was trained as
    native_size: int = 0  # training resolution in pixels (0: unknown)
    inpainting: bool = False  # a 9-channel inpainting U-Net
    usable: bool = True
    problem: str = ""  # why it cannot be used, for people
    defaults: dict = field(default_factory=dict)  # settings that suit it (blender_sd_addon.model_catalog)

    @classmethod
    def from_dict(cls, data: dict) -> ModelEntry:
        return _from_known(cls, data)


@dataclass
class ModelList:
    """list_models' result."""

    models: list[dict]  # ModelEntry, hub models first, then the models folder's, each sorted by name
    cache_dir: str  # the Hugging Face cache that was scanned ("" when include_cache was false)
    models_dir: str
    seconds: float
    task: str = "list_models"
    artifacts: list[dict] = field(default_factory=list)
    loras: list[dict] = field(default_factory=list)  # LoRA files in models_dir: {"model", "name", "size", "base"}

    @classmethod
    def from_dict(cls, data: dict) -> ModelList:
        return _from_known(cls, data)

    def entries(self) -> list[ModelEntry]:
        return [ModelEntry.from_dict(entry) for entry in self.models]


@dataclass
class TrainProgress(ProgressEvent):
    """train_lora's `progress` event: a ProgressEvent (steps done, total) with the step's loss."""

    loss: float = 0.0  # the last step's training loss
    seconds_left: float = 0.0  # estimated from this run's steps so far


@dataclass
class TrainResult:
    """train_lora's result."""

    lora: str  # the LoRA file (.safetensors, diffusers layout, training settings in its metadata)
    steps: int  # steps trained in all (a resumed run counts the checkpoint's)
    loss: float  # mean loss of the last steps
    losses: list[float]  # every step's loss, this run's and (resumed) the checkpoint's
    photos: list[str]  # the photos trained on
    skipped: list[dict]  # {"path", "reason"}: files that were not usable photos
    samples: list[str]  # sample images, in order
    checkpoints: list[str]  # checkpoint files written
    seconds: float
    params: dict
    task: str = "train_lora"
    artifacts: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> TrainResult:
        return _from_known(cls, data)


@dataclass
class JobInfo:
    """A job as `jobs` and `job` report it."""

    id: str | int
    task: str
    state: str  # one of JOB_STATES
    stage: str = ""
    step: int = 0
    total: int = 0
    elapsed: float = 0.0
    artifacts: list[dict] = field(default_factory=list)
    error: dict | None = None  # {"code", "message", "data"} once failed
    cancel_requested: bool = False
    queued_ahead: int = 0  # jobs before it in the queue (queued state only)


@dataclass
class HandshakeResult:
    protocol_version: int
    backend_version: str
    devices: list[str]
    schedulers: list[str]
    tasks: dict  # task name -> {"help", "params": [Param.to_wire()]}
    capabilities: list[str] = field(default_factory=list)
    torch_version: str = ""
    diffusers_version: str = ""
    loaded_model: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # task -> why the installed packages cannot run it

    @classmethod
    def from_dict(cls, data: dict) -> HandshakeResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
