"""download_model and list_models against a fake Hugging Face hub on loopback (no network), and the add-on's
stdlib view of the same cache (sdtex_contract.model_catalog).

The fake hub serves the few endpoints huggingface_hub uses to download (repo info, the recursive file tree, HEAD
and ranged GET of files); huggingface_hub is pointed at it through its endpoint setting, its cache at a temporary
folder. The repository is a tiny random pipeline laid out like stable-diffusion-v1-5: fp32 and fp16 safetensors,
pickle duplicates, a non-EMA U-Net, a safety checker, a feature extractor and root single-file checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend import downloads
from backend.context import JobContext
from backend.downloads import Progress, select_files
from backend.models import ModelManager
from backend.worker import Worker
from sdtex_contract import model_catalog, protocol, units
from sdtex_contract.protocol import DownloadResult, GenerateParams, ModelList

REPO_ID = "test-org/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# The file list of stable-diffusion-v1-5/stable-diffusion-v1-5 (sizes made up).
SD15_TREE = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]  # fmt: skip
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
NEEDED_FP16 = [
    "model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
]  # fmt: skip


def test_select_files_takes_only_what_the_pipeline_loads():
    tree = {path: 100 for path in SD15_TREE}
    assert sorted(select_files(tree, SD15_INDEX, "fp16")) == sorted(NEEDED_FP16)
    full = sorted(select_files(tree, SD15_INDEX, "fp32"))
    assert full == sorted(path.replace(".fp16", "") for path in NEEDED_FP16)  # never non_ema, .bin or root files
    # A component without fp16 files takes its full-precision ones; sharded weights bring their index.
    sharded = {p: 1 for p in tree if not p.startswith("unet/diffusion_pytorch_model.fp16")}
    sharded.update({"unet/diffusion_pytorch_model-00001-of-00002.safetensors": 1,
                    "unet/diffusion_pytorch_model-00002-of-00002.safetensors": 1,
                    "unet/diffusion_pytorch_model.safetensors.index.json": 1})  # fmt: skip
    del sharded["unet/diffusion_pytorch_model.safetensors"]
    chosen = select_files(sharded, SD15_INDEX, "fp16")
    assert [p for p in chosen if p.startswith("unet/")] == [
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/config.json",
    ]
    pickles_only = {p: 1 for p in tree if not (p.startswith("unet/") and p.endswith(".safetensors"))}
    with pytest.raises(protocol.ProtocolError, match="unet has no .safetensors weights") as info:
        select_files(pickles_only, SD15_INDEX)
    assert info.value.code == protocol.DOWNLOAD_FAILED


# --- the fake hub -------------------------------------------------------------------------------------------


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos
        self.gets: list[str] = []  # paths of GETs of files, in order
        self.delay = 0.0  # seconds to sleep per 64 KiB sent (a slow connection)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # quiet
        pass

    def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})

    def _file(self, head: bool) -> None:
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        files = self.server.repos.get(match[1]) if match else None
        if files is None or match[3] not in files:
            return self._not_found()
        data, path = files[match[3]], match[3]
        lfs = path.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        start = 0
        if not head and (rng := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))):
            start = int(rng[1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag}"')
        if lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if head:
            return
        self.server.gets.append(path)
        for offset in range(start, len(data), 65536):
            if self.server.delay:
                time.sleep(self.server.delay)
            try:
                self.wfile.write(data[offset : offset + 65536])
            except (BrokenPipeError, ConnectionResetError):
                return

    def do_HEAD(self):
        self._file(head=True)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/api/models/"):
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
            files = self.server.repos.get(match[1]) if match else None
            if files is None:
                return self._not_found()
            if match[2] == "revision":
                siblings = [{"rfilename": name} for name in files]
                return self._json({"id": match[1], "modelId": match[1], "sha": COMMIT, "siblings": siblings})
            tree = []
            for name, data in files.items():
                entry = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                if name.endswith(".safetensors"):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                tree.append(entry)
            return self._json(tree)
        self._file(head=False)


def _fp16_copy(path: Path) -> bytes:
    tensors = load_file(str(path))
    out = path.with_name("half.tmp")
    save_file({k: v.half() for k, v in tensors.items()}, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture(scope="module")
def hub_files(tiny_model_dir: Path) -> dict[str, bytes]:
    """A tiny pipeline laid out like the SD 1.5 repository (full and fp16 weights, and files never needed)."""
    files = {}
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file():
            name = path.relative_to(tiny_model_dir).as_posix()
            files[name] = path.read_bytes()
            if name.endswith(".safetensors"):
                files[name.replace(".safetensors", ".fp16.safetensors")] = _fp16_copy(path)
                files[name.replace(".safetensors", ".bin")] = b"pickle, never fetched"
    index = json.loads(files["model_index.json"])
    index.update(feature_extractor=SD15_INDEX["feature_extractor"], safety_checker=SD15_INDEX["safety_checker"])
    files["model_index.json"] = json.dumps(index).encode()
    files["feature_extractor/preprocessor_config.json"] = json.dumps(
        {"crop_size": 224, "do_normalize": True, "image_processor_type": "CLIPImageProcessor", "size": 224}
    ).encode()
    files["safety_checker/config.json"] = b"{}"
    files["safety_checker/model.safetensors"] = b"never fetched"
    files["unet/diffusion_pytorch_model.non_ema.safetensors"] = b"never fetched"
    files["v1-5-pruned-emaonly.safetensors"] = b"never fetched"
    files["README.md"] = b"# tiny"
    return files


@pytest.fixture
def hub(hub_files, tmp_path, monkeypatch):
    """The fake hub serving REPO_ID (and a pickle-only and a non-diffusers repo); huggingface_hub pointed at it,
    with an empty cache of its own."""
    from huggingface_hub import constants

    pickles = {k: v for k, v in hub_files.items() if not k.endswith(".safetensors")}
    server = FakeHub({REPO_ID: hub_files, "test-org/pickles": pickles, "test-org/lora": {"lora.safetensors": b"x"}})
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)  # what HF_ENDPOINT sets when huggingface_hub is imported
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    server.cache = cache
    yield server
    server.shutdown()
    server.server_close()


class Recorder:
    """The worker's emit: every message, thread-safe."""

    def __init__(self):
        self.messages: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, message: dict) -> None:
        with self.lock:
            self.messages.append(message)

    def events(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("event") == kind]

    def terminal(self, request_id: str) -> dict | None:
        return next((m for m in list(self.messages) if m.get("id") == request_id and protocol.is_terminal(m)), None)


def run_task(worker: Worker, request_id: str, params: dict) -> dict:
    worker.handle(protocol.request(request_id, protocol.RUN, params))
    reply = worker.emit.terminal(request_id)
    assert reply is not None and "result" in reply, reply
    return reply["result"]


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection other than a local (AF_UNIX) one raises: the fake hub on loopback included."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network blocked by the test: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts
    assert not attempts, f"something tried the network: {attempts}"


# --- tests --------------------------------------------------------------------------------------------------


def test_download_fetches_only_the_needed_files_with_progress_then_loads_offline(hub, hub_files, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)  # several progress updates per weight file
    worker = Worker(Recorder())
    assert model_catalog.local_status(REPO_ID, hub.cache) == "missing"
    start = time.perf_counter()
    result = DownloadResult.from_dict(run_task(worker, "d1", {"task": "download_model", "model": REPO_ID}))
    seconds = time.perf_counter() - start

    needed = sorted(p for p in hub_files if p in NEEDED_FP16 or p.startswith("tokenizer/"))  # tokenizer.json here
    assert result.files == needed and result.variant == "fp16" and result.family == "sd"
    assert result.model == REPO_ID and result.revision == COMMIT
    weights = [p for p in needed if p.endswith(".safetensors")]
    assert sorted(p for p in hub.gets if p.endswith(".safetensors")) == sorted(weights)  # nothing else fetched
    assert not [p for p in hub.gets if p.endswith(".bin") or "safety_checker" in p or "non_ema" in p]
    assert result.size == sum(len(hub_files[p]) for p in needed)

    # Progress: MB of MB rising to the total, the files count, a speed; `progress` mirrors the bytes.
    events = worker.emit.events(protocol.EVENT_DOWNLOAD)
    assert len(events) >= 3, events
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done) and done[-1] == events[-1]["bytes_total"] == result.downloaded > 0
    assert events[-1]["files_done"] == events[-1]["files_total"] == len(needed)
    assert any(e["speed"] > 0 for e in events)
    progress = worker.emit.events(protocol.EVENT_PROGRESS)
    assert progress[-1]["step"] == progress[-1]["total"] == result.downloaded
    assert {"stage": "downloading"} in worker.emit.events(protocol.EVENT_STATUS)
    print(f"download of {len(needed)} files, {result.size} bytes: {seconds:.2f}s, {len(events)} events")

    # The add-on's stdlib check sees it; downloading again fetches nothing.
    assert model_catalog.local_status(REPO_ID, hub.cache) == "cached"
    assert model_catalog.cached_snapshot(REPO_ID, hub.cache) == Path(result.path)
    hub.gets.clear()
    again = DownloadResult.from_dict(run_task(worker, "d2", {"task": "download_model", "model": REPO_ID}))
    assert again.downloaded == 0 and not [p for p in hub.gets if p.endswith(".safetensors")]

    # It loads by hub id with the network blocked: fp16 files picked, every weight equals the fp16 copy.
    with pytest.MonkeyPatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        guard = []
        real_connect = socket.socket.connect

        def guarded(sock, address):
            if sock.family == socket.AF_UNIX:
                return real_connect(sock, address)
            guard.append(address)
            raise OSError("network blocked")

        offline.setattr(socket.socket, "connect", guarded)
        params = GenerateParams.from_dict({"model": REPO_ID, "prompt": "x", "output_dir": "/unused", "device": "cpu"})
        model, _ = ModelManager().get(params)
        assert not guard, guard
    expected = load_file(str(Path(result.path) / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    for key, value in model.pipe.unet.state_dict().items():
        assert torch.equal(value, expected[key].float()), key

    # list_models finds it in the cache, usable, with its family and the settings that suit it.
    listed = ModelList.from_dict(run_task(worker, "l1", {"task": "list_models"}))
    (entry,) = [e for e in listed.entries() if e.model == REPO_ID]
    assert (entry.kind, entry.family, entry.base, entry.usable, entry.native_size) == ("hub", "sd", "sd1", True, 64)
    assert entry.defaults == model_catalog.defaults_for(REPO_ID, "sd1", 64).to_dict()
    assert listed.cache_dir == str(hub.cache)


def test_cancel_stops_within_a_chunk_and_a_rerun_completes(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    hub.delay = 0.05  # 64 KiB per 50 ms: the tiny model's weights take seconds
    worker = Worker(Recorder())
    work = worker.receive(protocol.request("c1", protocol.RUN, {"task": "download_model", "model": REPO_ID}))
    thread = threading.Thread(target=worker.execute, args=(work,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(e["bytes_done"] > 0 for e in worker.emit.events(protocol.EVENT_DOWNLOAD)):
        assert time.monotonic() < deadline and thread.is_alive(), worker.emit.messages[-3:]
        time.sleep(0.02)
    cancelled_at = time.monotonic()
    worker.cancel("c1")
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - cancelled_at < 5
    assert worker.emit.terminal("c1") == protocol.cancelled("c1")
    assert model_catalog.local_status(REPO_ID, hub.cache) in ("missing", "partial")  # never "cached"

    hub.delay = 0.0
    result = DownloadResult.from_dict(run_task(worker, "c2", {"task": "download_model", "model": REPO_ID}))
    assert 0 < result.downloaded <= result.size and model_catalog.local_status(REPO_ID, hub.cache) == "cached"


def test_disk_space_is_checked_before_any_weight_is_fetched(hub, monkeypatch):
    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    worker = Worker(Recorder())
    worker.handle(protocol.request("s1", protocol.RUN, {"task": "download_model", "model": REPO_ID}))
    error = worker.emit.terminal("s1")["error"]
    assert error["code"] == protocol.NOT_ENOUGH_SPACE
    assert str(hub.cache) in error["message"] and "needs" in error["message"] and "1.0 KB are free" in error["message"]
    assert not [p for p in hub.gets if p.endswith(".safetensors")]


@pytest.mark.parametrize(
    ("model", "code", "words"),
    [
        ("test-org/missing", protocol.MODEL_NOT_FOUND, "no model test-org/missing"),
        ("test-org/pickles", protocol.DOWNLOAD_FAILED, "no .safetensors weights"),
        ("test-org/lora", protocol.DOWNLOAD_FAILED, "not a diffusers pipeline"),
        ("not a hub id", protocol.INVALID_PARAMS, "owner/name"),
    ],
)
def test_download_errors_say_what_to_do(hub, model, code, words):
    worker = Worker(Recorder())
    worker.handle(protocol.request("e1", protocol.RUN, {"task": "download_model", "model": model}))
    error = worker.emit.terminal("e1")["error"]
    assert error["code"] == code and words in error["message"], error
    assert not [p for p in hub.gets if p.endswith(".safetensors")]


def test_download_into_a_folder(hub, tmp_path):
    folder = tmp_path / "models" / "tiny-sd"
    worker = Worker(Recorder())
    params = {"task": "download_model", "model": REPO_ID, "local_dir": str(folder), "variant": "fp32"}
    result = DownloadResult.from_dict(run_task(worker, "f1", params))
    assert result.model == str(folder) and Path(result.path) == folder and result.variant == "fp32"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.fp16.safetensors"))
    assert model_catalog.local_status(str(folder)) == "folder"


def test_list_models_folder(tmp_path, tiny_model_dir):
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "my-tiny-turbo")
    unet_key = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}
    xl_key = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}
    save_file({**unet_key, **xl_key}, str(models / "juggernaut-xl.safetensors"))
    (models / "loras").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2)}, str(models / "loras" / "detail.safetensors"))
    (models / "old.ckpt").write_bytes(b"pickle")
    (models / "notes").mkdir()
    (models / "notes" / "readme.txt").write_text("not a model")

    worker = Worker(Recorder())
    params = {"task": "list_models", "models_dir": str(models), "include_cache": False}
    listed = ModelList.from_dict(run_task(worker, "l2", params))
    entries = {entry.name: entry for entry in listed.entries()}
    assert sorted(entries) == ["detail.safetensors", "juggernaut-xl.safetensors", "my-tiny-turbo", "old.ckpt"]
    tiny = entries["my-tiny-turbo"]
    assert (tiny.kind, tiny.family, tiny.usable) == ("folder", "sd", True)
    assert tiny.defaults["steps"] == 1 and tiny.defaults["guidance_scale"] == 0.0  # "turbo" in its name
    xl = entries["juggernaut-xl.safetensors"]
    assert (xl.kind, xl.family, xl.base, xl.native_size, xl.usable) == ("single_file", "sdxl", "sdxl", 1024, True)
    assert xl.defaults["width"] == 1024 and xl.defaults["guidance_scale"] == 5.0
    assert (
        not entries["detail.safetensors"].usable and "not a whole checkpoint" in entries["detail.safetensors"].problem
    )
    assert not entries["old.ckpt"].usable and "allow_pickle" in entries["old.ckpt"].problem
    assert listed.cache_dir == "" and listed.models_dir == str(models)


def test_progress_reports_throttled_and_cancel_raises():
    reports = []
    cancelled = threading.Event()
    progress = Progress(1000, 2, reports.append, cancelled.is_set)
    bar = progress.tqdm_class()(desc="Reconstructing (incomplete total...)", total=0, unit="B")
    files = progress.tqdm_class()(desc="Fetching 2 files", total=2)
    for _ in range(10):
        bar.update(50)
    assert len(reports) == 1 and reports[0].bytes_done == 50  # the first report, then at most 4 a second
    files.update(1)
    files.update(1)  # the last file always reports
    assert reports[-1].bytes_done == 500 and reports[-1].files_done == 2
    cancelled.set()
    with pytest.raises(downloads.Cancelled):
        bar.update(10)


def test_model_catalog_defaults_and_texts():
    assert model_catalog.defaults_for("stabilityai/stable-diffusion-xl-base-1.0").width == 1024
    turbo = model_catalog.defaults_for("stabilityai/sdxl-turbo", "sdxl", 512)
    assert (turbo.width, turbo.steps, turbo.guidance_scale, turbo.steps_max) == (512, 1, 0.0, 4)
    lcm = model_catalog.defaults_for("/models/dreamshaper-LCM.safetensors", "sd1")
    assert (lcm.scheduler, lcm.steps, lcm.steps_min, lcm.steps_max) == ("lcm", 4, 4, 8)
    assert model_catalog.defaults_for("/models/plain.safetensors", "sd2").width == 768
    assert all(rule.scheduler in protocol.SCHEDULERS for rule in model_catalog.NAME_RULES)
    assert all(d.scheduler in protocol.SCHEDULERS for d in model_catalog.BASE_DEFAULTS.values())
    assert units.transfer_text(312e6, 2.1e9, 14.2e6) == "312 MB of 2.1 GB · 14 MB/s"
    env = {"HF_HOME": "/data/hf"}
    assert model_catalog.hf_cache_dir(env) == Path("/data/hf/hub")
    assert model_catalog.hf_cache_dir({"HF_HUB_CACHE": "/c", **env}) == Path("/c")
    assert (
        model_catalog.local_status("") == "invalid" and model_catalog.local_status("/no/such.safetensors") == "missing"
    )


def test_list_models_without_a_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "never-made"))
    listed = protocol.ModelList.from_dict(run_task(Worker(Recorder()), "l3", {"task": "list_models"}))
    assert listed.models == []
    ctx = JobContext(1, None, None)  # the task runs without the worker too
    from backend.tasks import list_models

    assert list_models.run(ctx, protocol.ListModelsParams.from_dict({"task": "list_models"})).models == []


def test_download_progress_over_the_protocol(hub, tmp_path):
    """The real worker process, pointed at the fake hub by HF_ENDPOINT: a download's events and result arrive as
    JSON lines, as the add-on's client reads them; list_models then finds the model."""
    from worker_process import WorkerProcess

    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HUB_DISABLE_XET": "1",
    }
    process = WorkerProcess(env=env)
    try:
        request_id = process.request(protocol.RUN, {"task": "download_model", "model": REPO_ID})
        reply, events = process.wait(request_id)
        assert "result" in reply, reply
        result = DownloadResult.from_dict(reply["result"])
        downloads_seen = [e["data"] for e in events if e["event"] == protocol.EVENT_DOWNLOAD]
        assert downloads_seen and downloads_seen[-1]["bytes_done"] == downloads_seen[-1]["bytes_total"] > 0
        assert result.model == REPO_ID and Path(result.path).is_relative_to(tmp_path / "cache")
        reply, _ = process.wait(process.request(protocol.RUN, {"task": "list_models"}))
        assert [e["model"] for e in reply["result"]["models"]] == [REPO_ID]
    finally:
        process.close()


def test_a_marigold_estimator_downloads_like_a_model_and_is_listed_as_one(hub, tmp_path):
    from backend.tiny_marigold import make_test_estimator

    source = make_test_estimator(tmp_path / "built", "normals")
    hub.repos["test-org/marigold-normals"] = {
        p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()
    }
    folder = tmp_path / "models" / "normals"
    params = {"task": "download_model", "model": "test-org/marigold-normals", "local_dir": str(folder)}
    result = DownloadResult.from_dict(run_task(Worker(Recorder()), "m1", params))
    assert Path(result.path) == folder and model_catalog.local_status(str(folder)) == "folder"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    entry = downloads.describe_folder(folder, str(folder), "folder", "normals", 0)
    assert not entry.usable and "estimator for PBR maps" in entry.problem  # not offered as a generator
