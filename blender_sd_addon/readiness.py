"""Is everything there to generate? The backend and model lines at the top of the panel.

Blender-free: the panel gathers plain facts (is an interpreter found, the installer's state, the worker's,
the model setting's state on disk, a running download) and draws what `check` returns. When something is
missing, `blocker` says why Generate is off and each line names the one-click fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import model_catalog, protocol

# Fixes: the operator each line offers (bl_idname, button label).
INSTALL = ("sdtex.install_backend", "Install Backend")
SET_INTERPRETER = ("sdtex.open_preferences", "Set Interpreter")
START = ("sdtex.start_backend", "Start Backend")
DOWNLOAD = ("sdtex.download_model", "Download Model")
CHOOSE = ("sdtex.browse_model", "Choose Model")
ON_DISK = ("sdtex.pick_model", "Models on Disk")
TEST_REMOTE = ("sdtex.test_connection", "Test Connection")
CANCEL_INSTALL = ("sdtex.install_backend_cancel", "Cancel Install")
OPEN_LOG = ("sdtex.open_install_log", "Open Log")
REINSTALL = ("sdtex.install_backend", "Reinstall Backend")  # installs the lock's versions, which work together
SET_ESTIMATORS = ("sdtex.open_preferences", "Set Estimator Models")  # Preferences > PBR Estimator Models
DOWNLOAD_ESTIMATOR = ("sdtex.download_estimator", "Download Estimator")
DOWNLOAD_PREVIEW_DECODER = ("sdtex.download_preview_decoder", "Download Preview Decoder")
SET_PREVIEW_DECODER = ("sdtex.open_preferences", "Set Preview Decoder")  # Preferences > Model
INSTALLED, SET = "installed", "set"  # Facts.interpreter_source: Install Backend's venv, Preferences > Interpreter
FEATURES = {"train_lora": "Training"}  # task -> its name in the panels


OK, ERROR, INFO = "ok", "error", "info"  # a line's kind: verified fine, wrong, or neither (not checked yet)
ICONS = {OK: "CHECKMARK", ERROR: "ERROR", INFO: "INFO"}


@dataclass(frozen=True)
class Line:
    """One status line: what the panel says, whether Generate can run, its kind (its icon), what fixes it.

    `ready` and `kind` differ on purpose: a worker that stopped with an error does not block Generate (which
    starts it again), but its line is still an error: only a state that was checked gets a check mark."""

    text: str
    ready: bool
    fixes: tuple[tuple[str, str], ...] = ()
    progress: float | None = None  # 0..1 while installing or downloading
    kind: str = ""  # OK, ERROR or INFO; "" = OK when ready, else ERROR

    def __post_init__(self) -> None:
        kind = self.kind or (OK if self.ready else ERROR)
        if kind not in ICONS:
            raise ValueError(f"kind must be one of {', '.join(ICONS)}, got {self.kind!r}")
        object.__setattr__(self, "kind", kind)

    @property
    def icon(self) -> str:
        if self.progress is not None:
            return "SORTTIME"
        return ICONS[self.kind]


def message_kind(message: str) -> str:
    """The kind of a status message written in the add-on's "error: ..." / "Failed: ..." convention (the worker's
    start-up thread, Test Connection)."""
    return ERROR if message.lower().startswith(("error", "failed")) else INFO


@dataclass(frozen=True)
class Facts:
    """What the panel knows at a redraw (plain values, gathered on Blender's main thread)."""

    remote: str = ""  # the remote backend's address (Preferences > Backend: Remote), empty for the local one
    interpreter_error: str = ""  # why no backend interpreter was found; empty when one was
    installing: bool = False
    install_progress: float = 0.0
    install_message: str = ""
    install_failed: bool = False
    install_log: str = ""  # the installation's log file (pip's whole output)
    interpreter: str = ""  # the backend's Python, when one was found
    interpreter_source: str = ""  # where it came from: INSTALLED, SET (Preferences) or "" (found elsewhere)
    remote_error: str = ""  # the last failure talking to the remote backend (Test Connection, a start)
    running: bool = False  # a worker process is up
    starting: bool = False  # ... and has not answered its handshake yet
    worker_error: str = ""  # the last start or stop message (a crash, a failed start)
    device: str = ""  # from the handshake, e.g. "cuda" or "cpu"
    torch_version: str = ""
    model: str = ""  # the model setting in effect
    model_state: str = ""  # model_catalog.local_status of it, or "remote" (the server has it, or says not)
    downloading: bool = False
    download_progress: float = 0.0
    download_text: str = ""  # the download job's status: "Downloading 312 MB of 2.1 GB · 14 MB/s"
    download_model: str = ""  # what it downloads ("": the model setting's): the generator's or an estimator's
    # The estimators the maps' Model methods need: (what uses it, e.g. "Normal", its model setting, local_status
    # or "remote"); empty when every map is classical or no maps are made.
    estimators: tuple[tuple[str, str, str], ...] = ()
    preview_decoder: str = ""  # Preferences > Preview Decoder ("": the latent approximation)
    preview_decoder_state: str = ""  # model_catalog.local_status of it, or "remote"


@dataclass(frozen=True)
class Readiness:
    backend: Line
    model: Line
    estimators: Line | None = None  # only when a map's Model method needs an estimator that is not there
    preview: Line | None = None  # only when a preview decoder is set and not on disk: never blocks Generate

    @property
    def lines(self) -> tuple[Line, ...]:
        return (self.backend, self.model) + tuple(line for line in (self.estimators, self.preview) if line)

    @property
    def blocker(self) -> str:
        """Why Generate is off ("" when it can run): the first line that is not ready."""
        for line in self.lines:
            if not line.ready:
                return line.text
        return ""


def check(facts: Facts) -> Readiness:
    lines = backend_line(facts), model_line(facts), estimator_line(facts.estimators, facts), preview_line(facts)
    return Readiness(*lines)


def backend_line(f: Facts) -> Line:
    if f.remote:
        return remote_line(f)
    if f.installing:
        return Line(f"Installing backend: {f.install_message}", False, (CANCEL_INSTALL,), f.install_progress)
    if f.interpreter_error:
        if f.install_failed:  # the message says the cause, the fix and where the log is
            return Line(f"Install failed: {f.install_message}", False, (OPEN_LOG, INSTALL, SET_INTERPRETER))
        return Line("Backend not installed", False, (INSTALL, SET_INTERPRETER))
    if f.running and f.starting:
        return Line("Backend starting…", True, kind=INFO)
    if f.running:
        return Line(f"Backend ready: {f.device or 'device unknown'}, torch {f.torch_version or '?'}", True)
    if f.worker_error:  # it stopped or failed to start; Generate starts it again, so not a blocker
        return Line(f"Backend stopped: {f.worker_error}", True, (START,), kind=message_kind(f.worker_error))
    if f.interpreter_source == INSTALLED:
        what = "Backend installed"
    elif f.interpreter_source == SET:  # the user's own Python: nothing was installed
        what = f"Backend interpreter set: {f.interpreter}"
    else:
        what = f"Backend interpreter found: {f.interpreter}" if f.interpreter else "Backend found"
    return Line(f"{what} (starts with the first Generate)", True, (START,), kind=INFO)


def remote_line(f: Facts) -> Line:
    if f.running and not f.starting:
        return Line(f"Remote backend ready: {f.remote} ({f.device or 'device unknown'})", True)
    problem = f.remote_error or (f.worker_error if message_kind(f.worker_error) == ERROR else "")
    if problem:  # Generate would try again, so not a blocker; but nothing says it works
        return Line(f"Remote backend {f.remote}: {problem}", True, (TEST_REMOTE,), kind=ERROR)
    return Line(f"Remote backend: {f.remote} (connects with the first Generate)", True, (TEST_REMOTE,), kind=INFO)


def model_line(f: Facts) -> Line:
    name = model_catalog.short_name(f.model) if f.model.strip() else ""
    if f.downloading and f.download_model in ("", f.model):
        return Line(f"{name}: {f.download_text}", False, progress=f.download_progress)
    state = f.model_state
    if state == "remote":  # on the server's disk: it answers for it
        return Line(f"Model on the server: {name}", True)
    if state in ("file", "folder", "cached"):
        return Line(f"Model ready: {name}", True)
    if state == "missing" and protocol.HUB_ID.match(f.model.strip()):
        return Line(f"Model not on disk: {name}", False, (DOWNLOAD, ON_DISK, CHOOSE))
    if state == "partial":
        return Line(f"Model download incomplete: {name}", False, (DOWNLOAD, CHOOSE))
    if not name:
        return Line("No model chosen", False, (ON_DISK, CHOOSE))
    if state == "missing":
        return Line(f"Model not found: {f.model}", False, (ON_DISK, CHOOSE))
    return Line(f"Not a model (no model_index.json, not a .safetensors file): {name}", False, (ON_DISK, CHOOSE))


# Which estimator each map method or switch needs when set to use a model (the contract's ESTIMATORS).
METHOD_ESTIMATORS = {
    "normal_method": ("Normal", "normals"),
    "height_method": ("Height", "depth"),
    "roughness_method": ("Roughness", "intrinsics"),
    "metallic_method": ("Metallic", "intrinsics"),
    "delight": ("Delight", "intrinsics"),
}


def estimators_needed(methods: dict) -> dict[str, list[str]]:
    """Estimator kind -> the maps that need it, for the methods set to "model" (delight: on)."""
    needed: dict[str, list[str]] = {}
    for name, (user, kind) in METHOD_ESTIMATORS.items():
        if methods.get(name) in ("model", True):
            needed.setdefault(kind, []).append(user)
    return needed


ESTIMATOR_STATES = {"missing": "not on disk", "partial": "download incomplete"}  # model_catalog.local_status


def missing_estimators(estimators: tuple[tuple[str, str, str], ...]) -> dict[str, tuple[list[str], str]]:
    """Estimator model -> (the maps that need it, its local_status) for those not there; the server answers for a
    remote one."""
    missing: dict[str, tuple[list[str], str]] = {}
    for user, model, state in estimators:
        if state not in ("remote", "folder", "cached"):
            missing.setdefault(model, ([], state))[0].append(user)
    return missing


def estimator_line(estimators: tuple[tuple[str, str, str], ...], f: Facts | None = None) -> Line | None:
    """The estimator models a Model method needs and that are not there, each named with the maps it is for, before
    the job runs (as the generator's "not on disk"), or the download of one (`f`'s download facts); None when all
    are there (or none is needed)."""
    missing = missing_estimators(estimators)
    if not missing:
        return None
    if f and f.downloading and f.download_model in missing:
        name = model_catalog.short_name(f.download_model)
        return Line(f"{name}: {f.download_text}", False, progress=f.download_progress)
    named = "; ".join(
        f"{model_catalog.short_name(model) if model.strip() else '(none set)'} for {', '.join(users)} "
        f"({ESTIMATOR_STATES.get(state, 'not a diffusers folder')})"
        for model, (users, state) in missing.items()
    )
    hub = any(protocol.HUB_ID.match(model.strip()) for model in missing)
    fixes = ((DOWNLOAD_ESTIMATOR,) if hub else ()) + (SET_ESTIMATORS,)
    plural = "s" if len(missing) > 1 else ""
    return Line(f"Estimator model{plural} not ready: {named}", False, fixes)


def preview_line(f: Facts) -> Line | None:
    """Previews will be approximate: the preview decoder is set and not on disk (or is downloading). Ready (an
    INFO line): the backend falls back to the approximation, so Generate stays on."""
    model = f.preview_decoder.strip()
    if not model or f.preview_decoder_state in ("remote", "folder", "cached"):
        return None
    name = model_catalog.short_name(model)
    if f.downloading and f.download_model == model:
        return Line(f"{name}: {f.download_text}", True, progress=f.download_progress, kind=INFO)
    state = ESTIMATOR_STATES.get(f.preview_decoder_state, "not an AutoencoderTiny folder")
    fixes = ((DOWNLOAD_PREVIEW_DECODER,) if protocol.HUB_ID.match(model) else ()) + (SET_PREVIEW_DECODER,)
    return Line(f"Previews will be approximate: preview decoder {name} {state}", True, fixes, kind=INFO)


def feature_line(unavailable: dict[str, str], task: str, remote: bool = False) -> Line | None:
    """What a feature's panel says when the backend's handshake listed its task as unavailable (its installed
    packages do not work together for it); None when the task can run or no handshake is known yet."""
    reason = unavailable.get(task)
    if not reason:
        return None
    name = FEATURES.get(task, task)
    if remote:  # the server's packages: only whoever runs it can reinstall them
        return Line(f"{name} unavailable on the server: {reason}", False)
    return Line(f"{name} unavailable: {reason}", False, (REINSTALL,))
