"""Models on disk and from the hub: what list_models and download_model do.

Downloads fetch only what the backend loads: model_index.json, each component's configs and tokenizer files, and
safetensors weights (the fp16 files where the repository has them). Never .bin/.ckpt/.onnx/.msgpack, never the
safety checker (the backend does not load it), never the single-file checkpoints some repositories also keep at
their root. The selection follows diffusers' own rule for what a pipeline needs (per component: the variant's
weights when it has them, else the plain ones; every file of a folder without weights), so
`from_pretrained(..., variant=...)` finds the cached snapshot complete with HF_HUB_OFFLINE=1.

Progress comes from huggingface_hub's own progress bars, through a tqdm class given to `snapshot_download`; it
also checks for cancel at every chunk, so cancel stops a download within one chunk (the partial file stays in the
cache, and the next download of the model resumes it).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from backend import single_file
from backend.estimators import PIPELINES as ESTIMATOR_PIPELINES
from backend.families import family_of_class_name
from sdtex_contract import model_catalog, units
from sdtex_contract.protocol import (
    DOWNLOAD_FAILED,
    MODEL_NOT_FOUND,
    NOT_ENOUGH_SPACE,
    DownloadProgress,
    ModelEntry,
    ProtocolError,
)

SKIPPED_COMPONENTS = ("safety_checker",)  # never loaded: models.py passes safety_checker=None
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".pb", ".h5")
IGNORED_SUFFIXES = (".bin", ".msgpack", ".onnx", ".pb")  # what diffusers itself skips when safetensors exist
ROOT_FILES = ("model_index.json", "scheduler_config.json", "config.json")  # root files diffusers may expect
SPACE_MARGIN = 1.05  # a download needs its bytes plus 5 % (and at least 100 MB) of free space
SPACE_MIN_SPARE = 100 * 10**6
PROGRESS_INTERVAL = 0.25  # seconds between progress events
SPEED_WINDOW = 3.0  # seconds the speed is averaged over


class Cancelled(Exception):
    """Raised inside huggingface_hub's download threads when the job is cancelled."""


# --- which files --------------------------------------------------------------------------------------------


# diffusers' weight names (pipeline_loading_utils.variant_compatible_siblings): anything else in a component folder,
# such as unet/diffusion_pytorch_model.non_ema.safetensors, is not loaded.
_PLAIN_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.safetensors")
_FP16_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)\.fp16(-\d{5}-of-\d{5})?\.safetensors")
_INDEX = re.compile(r"(diffusion_pytorch_model|model)\.safetensors\.index(\.fp16)?\.json")


def is_fp16(path: str) -> bool:
    return _FP16_WEIGHTS.fullmatch(path.rsplit("/", 1)[-1]) is not None


def select_files(tree: dict[str, int], model_index: dict, variant: str = "fp16") -> list[str]:
    """The repository paths a pipeline needs, from its file list (path -> size) and model_index.json.

    Raises ProtocolError(DOWNLOAD_FAILED) when a component has no safetensors weights (pickle files only)."""
    chosen = [name for name in ROOT_FILES if name in tree]
    folders = [
        name
        for name, value in model_index.items()
        if isinstance(value, list) and value and value[0] is not None and name not in SKIPPED_COMPONENTS
    ]
    for folder in folders:
        files = sorted(path for path in tree if path.startswith(folder + "/"))
        direct = [path for path in files if path.count("/") == 1]
        weights = [path for path in direct if path.endswith(WEIGHT_SUFFIXES)]
        if not weights:  # scheduler, tokenizer, feature extractor: diffusers expects the whole folder
            chosen += [path for path in files if not path.endswith(IGNORED_SUFFIXES)]
            continue
        names = {path: path.split("/")[-1] for path in direct}
        half = [path for path in direct if _FP16_WEIGHTS.fullmatch(names[path])]
        full = [path for path in direct if _PLAIN_WEIGHTS.fullmatch(names[path])]
        if not half and not full:
            names = ", ".join(path.split("/")[-1] for path in weights)
            raise ProtocolError(
                DOWNLOAD_FAILED,
                f"{folder} has no .safetensors weights ({names}); pickle weights can run code and are never "
                "downloaded: pick another repository, or download and convert it yourself",
                {"param": "model"},
            )
        use_half = bool(half) and (variant == "fp16" or not full)
        chosen += half if use_half else full
        # Sharded weights come with an index: model.safetensors.index.json, or .index.fp16.json for the variant.
        chosen += [path for path in direct if (index := _INDEX.fullmatch(names[path])) and bool(index[2]) == use_half]
        if f"{folder}/config.json" in tree:
            chosen.append(f"{folder}/config.json")
    return list(dict.fromkeys(chosen))


# --- disk space ---------------------------------------------------------------------------------------------


def is_estimator(class_name: object) -> bool:
    """A Marigold pipeline's model_index `_class_name`: downloaded like a generator, used for the PBR maps."""
    return class_name in {pipeline.__name__ for pipeline in ESTIMATOR_PIPELINES.values()}


def decoder_files(tree: dict[str, int], repo_id: str) -> list[str]:
    """A preview decoder's repository (AutoencoderTiny: TAESD) needs its config and its safetensors weights only
    (madebyollin/taesd also holds .bin and the original .pth files)."""
    if model_catalog.PREVIEW_DECODER_WEIGHTS not in tree:
        raise ProtocolError(
            DOWNLOAD_FAILED,
            f"{repo_id} has no {model_catalog.PREVIEW_DECODER_WEIGHTS}; pickle weights are never downloaded",
            {"param": "model", "value": repo_id},
        )
    return ["config.json", model_catalog.PREVIEW_DECODER_WEIGHTS]


def check_free_space(folder: Path, needed: int) -> None:
    """ProtocolError(NOT_ENOUGH_SPACE) naming the folder when it lacks `needed` bytes and a margin."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    wanted = max(int(needed * SPACE_MARGIN), needed + SPACE_MIN_SPARE)
    if free < wanted:
        raise ProtocolError(
            NOT_ENOUGH_SPACE,
            f"not enough free space in {folder}: the download needs {units.size_text(wanted)} "
            f"and {units.size_text(free)} are free; free some space or choose another folder",
            {"folder": str(folder), "needed": wanted, "free": free},
        )


# --- progress -----------------------------------------------------------------------------------------------


class Progress:
    """Bytes and files done, from any download thread; reports at most every PROGRESS_INTERVAL seconds."""

    def __init__(
        self,
        bytes_total: int,
        files_total: int,
        report: Callable[[DownloadProgress], None],
        is_cancelled: Callable[[], bool] = lambda: False,
    ):
        self.bytes_total, self.files_total = bytes_total, files_total
        self.bytes_done = self.files_done = 0
        self.report, self.is_cancelled = report, is_cancelled
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._last_report = 0.0

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        """Count progress (from a download thread), report it when due; raise Cancelled when cancelled."""
        with self._lock:
            self.bytes_done += nbytes
            self.files_done += files
            now = time.monotonic()
            self._samples.append((now, self.bytes_done))
            while len(self._samples) > 2 and now - self._samples[1][0] > SPEED_WINDOW:
                self._samples.popleft()
            due = now - self._last_report >= PROGRESS_INTERVAL or self.files_done == self.files_total
            if due:
                self._last_report = now
                snapshot = self.snapshot(now)
        if due:
            self.report(snapshot)
        if self.is_cancelled():
            raise Cancelled()

    def snapshot(self, now: float | None = None) -> DownloadProgress:
        now = now or time.monotonic()
        (then, before), (_, latest) = self._samples[0], self._samples[-1]
        speed = (latest - before) / (now - then) if now > then else 0.0
        return DownloadProgress(
            bytes_done=min(self.bytes_done, self.bytes_total) if self.bytes_total else self.bytes_done,
            bytes_total=self.bytes_total,
            files_done=self.files_done,
            files_total=self.files_total,
            speed=round(speed, 1),
            elapsed=round(now - self.started, 3),
        )

    def tqdm_class(self) -> type:
        """A tqdm class for snapshot_download: its bytes bar and files bar feed this Progress; nothing is drawn."""
        progress = self

        class ProgressBar(tqdm):
            def __init__(self, *args, **kwargs):
                desc = str(kwargs.get("desc") or "")
                # snapshot_download's bars: "Fetching N files" (files), "Reconstructing ..." (bytes written to
                # disk, fed by every file's download), "Downloading bytes" (network bytes of xet transfers: skipped).
                self.role = (
                    "files" if desc.startswith("Fetching") else "bytes" if desc.startswith("Reconstruct") else ""
                )
                kwargs.pop("name", None)
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                n = int(n or 0)
                if self.role == "bytes":
                    progress.add(nbytes=n)
                elif self.role == "files":
                    progress.add(files=n)
                elif progress.is_cancelled():
                    raise Cancelled()

        return ProgressBar


# --- download -----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a download will fetch, decided before any weight is transferred."""

    repo_id: str
    commit: str
    model_index: dict
    files: dict[str, int]  # path -> size, every file the model needs
    missing: dict[str, int]  # the ones not on disk yet

    @property
    def size(self) -> int:
        return sum(self.files.values())


def _not_a_pipeline(repo_id: str) -> ProtocolError:
    return ProtocolError(
        DOWNLOAD_FAILED,
        f"{repo_id} is not a diffusers pipeline (no model_index.json): download one .safetensors checkpoint "
        "from it yourself and pick the file instead",
        {"param": "model", "value": repo_id},
    )


def _hub_error(repo_id: str, exc: Exception) -> ProtocolError:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    data = {"param": "model", "value": repo_id}
    if isinstance(exc, GatedRepoError):
        return ProtocolError(
            DOWNLOAD_FAILED,
            f"{repo_id} is gated: accept its licence on its Hugging Face page, then log in on this computer "
            "(`hf auth login`, or set HF_TOKEN) and download again",
            data,
        )
    if isinstance(exc, RevisionNotFoundError):
        return ProtocolError(MODEL_NOT_FOUND, f"{repo_id} has no such revision ({exc})", {**data, "param": "revision"})
    if isinstance(exc, RepositoryNotFoundError):
        return ProtocolError(
            MODEL_NOT_FOUND, f"no model {repo_id} on the Hugging Face hub (or it is private: log in first)", data
        )
    if isinstance(exc, OfflineModeIsEnabled | LocalEntryNotFoundError):
        return ProtocolError(
            DOWNLOAD_FAILED, f"cannot download {repo_id}: HF_HUB_OFFLINE is set or the hub is unreachable", data
        )
    return ProtocolError(DOWNLOAD_FAILED, f"cannot download {repo_id}: {type(exc).__name__}: {exc}", data)


def plan_download(
    repo_id: str,
    revision: str = "main",
    variant: str = "fp16",
    local_dir: Path | None = None,
    endpoint: str | None = None,
) -> Plan:
    """Ask the hub what the model's files are (file list and model_index.json, no weights) and which are missing."""
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFile

    endpoint = endpoint or constants.ENDPOINT  # read now (HF_ENDPOINT), not when huggingface_hub was imported
    api = HfApi(endpoint=endpoint)
    try:
        commit = api.repo_info(repo_id, revision=revision).sha
        tree = {
            f.path: f.size
            for f in api.list_repo_tree(repo_id, recursive=True, revision=commit)
            if isinstance(f, RepoFile)
        }
        index_name = "model_index.json" if "model_index.json" in tree else "config.json"  # config: a decoder's
        if index_name not in tree:
            raise _not_a_pipeline(repo_id)
        index_path = hf_hub_download(repo_id, index_name, revision=commit, local_dir=local_dir, endpoint=endpoint)
    except ProtocolError:
        raise
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
    model_index = json.loads(Path(index_path).read_text(encoding="utf-8"))
    name = model_index.get("_class_name")
    decoder = name == model_catalog.PREVIEW_DECODER_CLASS and index_name == "config.json"
    if index_name == "config.json" and not decoder:
        raise _not_a_pipeline(repo_id)
    if family_of_class_name(name) is None and not is_estimator(name) and not decoder:
        raise ProtocolError(
            DOWNLOAD_FAILED,
            f"{repo_id} is a {name}: this add-on runs Stable Diffusion 1.x/2.x and SDXL pipelines, Marigold "
            "estimators for PBR maps and AutoencoderTiny preview decoders",
            {"param": "model", "value": repo_id},
        )
    chosen = decoder_files(tree, repo_id) if decoder else select_files(tree, model_index, variant)
    files = {path: tree[path] for path in chosen}
    missing = {}
    for path, size in files.items():
        if local_dir is not None:
            on_disk = (local_dir / path).is_file() and (local_dir / path).stat().st_size == size
        else:
            on_disk = isinstance(try_to_load_from_cache(repo_id, path, revision=commit), str)
        if not on_disk:
            missing[path] = size
    return Plan(repo_id, commit, model_index, files, missing)


def download(
    plan: Plan,
    revision: str,
    report: Callable[[DownloadProgress], None],
    is_cancelled: Callable[[], bool] = lambda: False,
    local_dir: Path | None = None,
    endpoint: str | None = None,
) -> tuple[Path, int]:
    """Fetch the plan's missing files (after checking free space); returns the snapshot folder and the bytes fetched.
    Raises Cancelled when cancelled, ProtocolError when the hub or the disk fails."""
    from huggingface_hub import constants, snapshot_download

    target = local_dir if local_dir is not None else Path(constants.HF_HUB_CACHE)
    endpoint = endpoint or constants.ENDPOINT
    check_free_space(target, sum(plan.missing.values()))
    progress = Progress(sum(plan.missing.values()), len(plan.files), report, is_cancelled)
    # Plain HTTP, not Xet: an HTTP download calls the progress bar between chunks in Python, where cancel raises;
    # Xet reports from its own native threads, where an exception may not stop the transfer.
    xet_was_disabled, constants.HF_HUB_DISABLE_XET = constants.HF_HUB_DISABLE_XET, True
    try:
        folder = snapshot_download(
            plan.repo_id,
            revision=revision,  # a branch name, so the cache records it (refs/main) for offline loading by id
            allow_patterns=list(plan.files),
            local_dir=local_dir,
            endpoint=endpoint,
            tqdm_class=progress.tqdm_class(),
        )
    except Cancelled:
        raise
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC: another program filled the disk meanwhile
            raise ProtocolError(NOT_ENOUGH_SPACE, f"the disk holding {target} filled up while downloading") from None
        raise _hub_error(plan.repo_id, exc) from None
    except Exception as exc:
        if is_cancelled():
            raise Cancelled() from None
        raise _hub_error(plan.repo_id, exc) from None
    finally:
        constants.HF_HUB_DISABLE_XET = xet_was_disabled
    report(progress.snapshot())
    return Path(folder), progress.bytes_done


# --- what is on disk ----------------------------------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def describe_folder(folder: Path, model: str, kind: str, name: str, size: int) -> ModelEntry:
    """A diffusers folder (or cache snapshot) as a list entry: family, architecture, training size, problems."""
    index = _json(folder / "model_index.json") or _json(folder / "config.json")
    entry = ModelEntry(model=model, kind=kind, name=name, path=str(folder), size=size)
    class_name = index.get("_class_name")
    family = family_of_class_name(class_name if isinstance(class_name, str) else None)
    if family is None:
        problem = f"a {class_name or 'folder without a pipeline class'}, not SD 1.x/2.x or SDXL"
        if is_estimator(class_name):
            problem = f"a {class_name}: an estimator for PBR maps (Preferences > PBR Estimator Models), not a generator"
        elif model_catalog.is_preview_decoder(folder):
            problem = f"a {class_name}: a preview decoder (Preferences > Preview Decoder), not a generator"
        entry.usable, entry.problem = False, problem
        return entry
    unet, vae = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    entry.family = family.name
    entry.base = "sdxl" if family.name == "sdxl" else "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"
    entry.inpainting = unet.get("in_channels") == 9
    if isinstance(unet.get("sample_size"), int) and isinstance(vae.get("block_out_channels"), list):
        entry.native_size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    weights = [f for f in folder.glob("*/*") if f.name.endswith(WEIGHT_SUFFIXES)]
    if missing := model_catalog.missing_weights(folder):
        entry.usable = False
        entry.problem = f"{', '.join(missing)}: no weights on disk (an interrupted download?); download it again"
    elif not any(f.suffix == ".safetensors" for f in weights):
        entry.usable, entry.problem = False, "pickle weights only (.bin): needs allow_pickle"
    entry.defaults = model_catalog.defaults_for(model, entry.base, entry.native_size).to_dict()
    return entry


def describe_file(path: Path) -> ModelEntry:
    """A single-file checkpoint as a list entry (its header is read, not its weights)."""
    entry = ModelEntry(model=str(path), kind="single_file", name=path.name, path=str(path), size=path.stat().st_size)
    if path.suffix.lower() != ".safetensors":
        entry.usable, entry.problem = False, "a pickle checkpoint (can run code when loaded): needs allow_pickle"
        return entry
    try:
        kind = single_file.checkpoint_kind(path)
    except ProtocolError as exc:
        entry.usable, entry.problem = False, exc.message.removeprefix(path.name + " ")
        return entry
    entry.family, entry.base = kind.family.name, kind.base
    unet = _json(kind.config_dir / "unet" / "config.json")
    entry.native_size = unet.get("sample_size", 0) * 8
    entry.defaults = model_catalog.defaults_for(str(path), kind.base, entry.native_size).to_dict()
    return entry


def cached_models(cache_dir: Path | None = None) -> list[ModelEntry]:
    """Diffusers pipelines in the Hugging Face cache (repos with a model_index.json), by huggingface_hub's scan."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    entries = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        revisions = [r for r in repo.revisions if _is_model_folder(r.snapshot_path)]
        if not revisions:
            continue
        # The revision `main` points to (what loading by id uses), else the newest.
        revision = next((r for r in revisions if "main" in r.refs), max(revisions, key=lambda r: r.last_modified))
        entries.append(
            describe_folder(revision.snapshot_path, repo.repo_id, "hub", repo.repo_id, revision.size_on_disk)
        )
    return entries


def _is_model_folder(folder: Path) -> bool:
    """A pipeline's folder (model_index.json) or a preview decoder's."""
    return (folder / "model_index.json").is_file() or model_catalog.is_preview_decoder(folder)


def folder_models(models_dir: Path) -> list[ModelEntry]:
    """A models folder's diffusers folders and checkpoint files (its own entries, and one level down)."""
    entries = []
    candidates = sorted(models_dir.iterdir(), key=lambda p: p.name.lower())
    for path in candidates:
        try:
            if path.is_dir() and _is_model_folder(path):
                entries.append(describe_folder(path, str(path), "folder", path.name, _folder_size(path)))
            elif path.is_dir() and not path.name.startswith("."):
                candidates_below = sorted(path.iterdir(), key=lambda p: p.name.lower())
                for sub in candidates_below:
                    if sub.is_dir() and _is_model_folder(sub):
                        entries.append(
                            describe_folder(sub, str(sub), "folder", f"{path.name}/{sub.name}", _folder_size(sub))
                        )
                    elif sub.is_file() and sub.suffix.lower() in (".safetensors", ".ckpt"):
                        entries.append(describe_file(sub))
            elif path.is_file() and path.suffix.lower() in (".safetensors", ".ckpt"):
                entries.append(describe_file(path))
        except OSError:
            continue  # unreadable entries are skipped, not fatal
    return entries


def entries_as_dicts(entries: list[ModelEntry]) -> list[dict]:
    return [asdict(entry) for entry in entries]


def model_not_found(path: str) -> ProtocolError:
    return ProtocolError(MODEL_NOT_FOUND, f"no folder {path}", {"param": "models_dir", "value": path})
