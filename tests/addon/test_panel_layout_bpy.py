"""What the artist sees in the sidebar (bpy, panels drawn into a recording layout): Generate stays where it is when
lines come and go, each error is under the button that caused it, the labels match the tooltips, long paths break
at a separator, progress is a bar on every Blender, Train names its phases and keeps its loss line over Resume,
and the size offered suits the device and the model."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon.blender import (  # noqa: E402
    own_message,
    panels,
    session,
    size_hint,
    train,
    travel,
    ui_state,
)
from blender_sd_addon.contract import protocol  # noqa: E402
from blender_sd_addon.jobs import Job  # noqa: E402

WIDTH = 280


class Recorder:
    """Stands in for a UILayout: records labels, operators and props in the order drawn."""

    def __init__(self, drawn: list | None = None):
        self.drawn = [] if drawn is None else drawn

    def __getattr__(self, name):  # rows, columns, boxes, splits, template_list...: the same recorder
        return lambda *args, **kwargs: self

    def label(self, text="", icon="NONE", **kwargs):
        self.drawn.append(("label", text, icon))

    def operator(self, idname, text=None, **kwargs):
        self.drawn.append(("operator", idname, text))
        return SimpleNamespace()

    def prop(self, data, name, text=None, **kwargs):
        getattr(data, name)  # AttributeError for a control that is not there
        self.drawn.append(("prop", name, text))


def draw(panel_class, scene) -> list:
    ui_state.STATE.readiness = None
    layout = Recorder()
    context = SimpleNamespace(scene=scene, region=SimpleNamespace(width=WIDTH))
    panel_class.draw(SimpleNamespace(layout=layout), context)
    return layout.drawn


def above_generate(drawn: list) -> list:
    return drawn[: drawn.index(("operator", "sdtex.generate", None))]


@pytest.fixture
def quiet():
    yield
    ui_state.STATE.say("")
    own_message.MESSAGES.clear()


def test_generate_does_not_move_when_errors_and_setup_lines_appear(scene, quiet):
    calm = draw(panels.MainPanel, scene)
    ui_state.STATE.say("The backend stopped: out of memory on the CPU", is_error=True)
    busy = draw(panels.MainPanel, scene)

    assert above_generate(busy) == above_generate(calm)  # the same controls above the button: it stays put
    generate = busy.index(("operator", "sdtex.generate", None))
    error = next(i for i, item in enumerate(busy) if item[0] == "label" and item[2] == "ERROR")
    folder = busy.index(("operator", "sdtex.open_folder", None))  # the unsaved-file block (tests run unsaved)
    assert generate < error and generate < folder
    assert not any(item[1].startswith("sdtex.start_backend") for item in above_generate(busy))


def test_the_negative_prompt_is_called_what_its_tooltip_calls_it(scene):
    drawn = draw(panels.MainPanel, scene)
    assert ("label", "Negative Prompt", "NONE") in drawn and not any(item[1] == "Avoid" for item in drawn)
    assert scene.sdtex.bl_rna.properties["negative_prompt"].name == "Negative Prompt"


def test_a_travel_error_is_under_the_travel_button_in_the_panels_words(scene, quiet):
    with pytest.raises(RuntimeError, match="Add Keyframe button"):
        bpy.ops.sdtex.travel(apply=False)  # no keyframes yet
    travel_drawn = draw(travel.TravelPanel, scene)
    button = travel_drawn.index(("operator", "sdtex.travel", None))
    errors = [i for i, item in enumerate(travel_drawn) if item[0] == "label" and item[2] == "ERROR"]
    assert errors and errors[0] > button  # below its own button
    assert not any(item[2] == "ERROR" for item in draw(panels.MainPanel, scene) if item[0] == "label")
    assert ("prop", "easing", None) in travel_drawn  # the easing menu has its label


def test_errors_name_choices_as_the_menus_do():
    text = own_message.in_ui_words(
        "mask: mask_from is image but no mask image was given (white = repaint); give one, or set mask_from "
        "to alpha, rect or none"
    )
    assert text == (
        "mask: Mask From is Image but no mask image was given (white = repaint); give one, or set Mask From "
        "to Alpha, Rectangle or Off"
    )


def test_a_long_path_breaks_after_a_separator():
    path = "/home/artist/projects/cobblestone_floor_variations/textures/SD_cobblestone_floor_0001.png"
    lines = panels.message_lines(f"Saved in {path}", WIDTH)  # 40 characters: each folder name fits
    assert lines == [
        "Saved in /home/artist/projects/", "cobblestone_floor_variations/textures/", os.path.basename(path)
    ]  # fmt: skip
    assert all(len(line) <= WIDTH / 7 for line in lines)
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # 21 characters a line: the "/" never on its own
    assert panels.message_lines(hub_id, 21 * 7) == ["stable-diffusion-v1-5/", "stable-diffusion-v1-5"]


class Blender34Layout(Recorder):
    def __getattr__(self, name):
        if name == "progress":  # layout.progress came in Blender 4.0
            raise AttributeError(name)
        return super().__getattr__(name)


def test_progress_is_a_bar_where_blender_has_no_progress_widget():
    layout = Blender34Layout()
    panels.draw_progress(layout, 0.3, "View 3/8")
    ((kind, text, _),) = layout.drawn
    assert kind == "label" and text == "██░░░ 30% · View 3/8"


def test_sub_panels_follow_what_the_artist_does_and_the_rare_ones_start_closed():
    children = {
        cls.bl_label: cls
        for cls in bpy.types.Panel.__subclasses__()
        if getattr(cls, "bl_parent_id", "") == "SDTEX_PT_mainpanel_view_3d"
    }
    in_order = [label for label, _ in sorted(children.items(), key=lambda item: item[1].bl_order)]
    assert in_order == [
        "Size and Seed", "Material & PBR", "Advanced", "LoRAs", "Project", "Animate (Travel)", "Train", "Batch",
        "History",
    ]  # fmt: skip
    assert len({cls.bl_order for cls in children.values()}) == len(children)  # none left at the default order
    still_open = [label for label, cls in children.items() if "DEFAULT_CLOSED" not in getattr(cls, "bl_options", ())]
    assert still_open == ["Size and Seed"]
    assert bpy.types.SDTEX_PT_pbrpanel_view_3d.bl_parent_id == "SDTEX_PT_applypanel_view_3d"  # PBR in Material


def test_the_size_offered_suits_the_device_and_the_model():
    sd15, sdxl = "runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
    assert size_hint.suggestion(512, 512, sd15, cpu=True)[0] == (256, 256)
    assert size_hint.suggestion(768, 512, sd15, cpu=True)[0] == (256, 168)  # the aspect kept, multiples of 8
    assert size_hint.suggestion(256, 256, sd15, cpu=True) is None
    assert size_hint.suggestion(512, 512, sd15, cpu=False) is None
    assert size_hint.suggestion(512, 512, sdxl, cpu=False) == ((1024, 1024), "SDXL: trained at 1024 x 1024.")


def test_travel_frames_folder_is_named_by_its_prompts():
    assert travel.frames_prefix(["cobblestone floor", "mossy rock, wet"]) == "travel_cobblestone_floor-mossy_rock_wet"
    assert travel.frames_prefix(["same", "same"]) == "travel_same" and travel.frames_prefix(["", "!!"]) == "travel"


# --- Train ------------------------------------------------------------------------------------------------


def training_job(stage: str, step: int, total: int, losses: tuple = ()) -> Job:
    return Job(None, "r1", train.TASK, state="running", stage=stage, step=step, total=total, losses=list(losses))


def test_train_names_its_phases():
    assert train.progress_text(training_job("class_images", 35, 50)) == "Class images 35/50"
    assert train.progress_text(training_job("training", 10, 40, (0.2, 0.1234))) == "Training 10/40 · loss 0.1234"
    assert panels.job_progress(training_job("training", 10, 40)) == (0.25, "Training 10/40")  # the board's row


class FakeClient:
    """Answers one train_lora job: a progress event per loss, then `final` (a result, or cancelled)."""

    alive, starting, handshake = True, False, None

    def __init__(self, losses: list[float], final: dict):
        self.losses, self.final, self.params = losses, final, {}

    def submit(self, method: str, params: dict) -> str:
        self.params = params
        return "r1"

    def wait(self, request_id: str, on_event):
        for i, loss in enumerate(self.losses, 1):
            on_event({"event": protocol.EVENT_PROGRESS, "data": {"step": i, "total": len(self.losses), "loss": loss}})
        return self.final


def result(lora: str, losses: list[float], skipped: list[dict]) -> dict:
    return {
        "lora": lora, "steps": len(losses), "loss": losses[-1], "losses": losses, "photos": [], "skipped": skipped,
        "samples": [], "checkpoints": [], "seconds": 1.0, "params": {},
    }  # fmt: skip


def test_resume_keeps_the_loss_line_and_the_lora_goes_to_its_own_folder(scene, tmp_path, monkeypatch):
    scene.sdtex_train.photos_dir = str(tmp_path)
    first = FakeClient([3.0, 2.0], {"cancelled": True})
    monkeypatch.setattr(session, "get_client", lambda: first)
    train.start(scene)
    assert first.params["output_dir"] == train.lora_folder() and os.path.basename(train.lora_folder()) == "loras"
    assert first.params["output_dir"] != session.output_folder(None)  # not among the textures

    lora = str(tmp_path / "sks_lora.safetensors")
    skipped = [{"path": str(tmp_path / "notes.txt"), "reason": "not an image"}]
    second = FakeClient([1.5, 1.0], {"result": result(lora, [3.0, 2.0, 1.5, 1.0], skipped)})
    monkeypatch.setattr(session, "get_client", lambda: second)
    train.start(scene, resume_from=str(tmp_path / "checkpoint.pt"))
    assert train.all_losses(train.STATE.job) == [3.0, 2.0, 1.5, 1.0]  # the line goes on, it does not restart

    drawn = Recorder()
    train.draw_skipped(drawn, WIDTH)
    assert "Skipped 1 photo: notes.txt: not an image" in " ".join(text for _, text, _ in drawn.drawn)
    row = Recorder()
    (entry,) = scene.sdtex_train.loras
    train.SDTEX_UL_loras.draw_item(None, None, row, None, entry, 0, None, "", index=0)
    assert ("operator", "sdtex.lora_choose", "sks_lora.safetensors") in row.drawn  # the name, not a cut path
    tooltip = train.SDTEX_OT_lora_choose.description(bpy.context, SimpleNamespace(index=0))
    assert tooltip == lora


def test_remote_mode_hides_the_local_backends_section(scene):
    from blender_sd_addon.blender import preferences

    prefs = session.preferences()

    def drawn_props(mode: str) -> set[str]:
        layout = Recorder()
        values = {name: getattr(prefs, name) for name in prefs.bl_rna.properties.keys()}
        proxy = SimpleNamespace(**values | {"layout": layout, "backend_mode": mode})
        context = SimpleNamespace(scene=scene, region=SimpleNamespace(width=600))
        preferences.SDTEX_AP_preferences.draw(proxy, context)
        return {name for kind, name, _ in layout.drawn if kind == "prop"}

    assert "backend_python" in drawn_props("LOCAL") and "backend_python" not in drawn_props("REMOTE")
    assert "remote_address" in drawn_props("REMOTE") and "model" in drawn_props("REMOTE")


def test_the_gpu_options_are_preferences_sent_with_every_request(scene):
    from blender_sd_addon.blender import preferences

    prefs = session.preferences()
    for name in ("channels_last", "compile"):
        assert getattr(prefs, name) == protocol.param(name, "txt2img").default
    layout = Recorder()
    values = {name: getattr(prefs, name) for name in prefs.bl_rna.properties.keys()}
    proxy = SimpleNamespace(**values | {"layout": layout, "backend_mode": "LOCAL"})
    preferences.SDTEX_AP_preferences.draw(proxy, SimpleNamespace(scene=scene, region=SimpleNamespace(width=600)))
    assert {"channels_last", "compile"} <= {name for kind, name, _ in layout.drawn if kind == "prop"}
    prefs.channels_last, prefs.compile = "on", True
    try:
        sent = session.load_model_params()
        assert (sent["channels_last"], sent["compile"]) == ("on", True)
        assert {"channels_last", "compile"} <= set(session.BACKEND_SETTINGS)
    finally:
        prefs.channels_last, prefs.compile = "auto", False


def test_an_empty_controlnet_field_says_which_one_it_uses(scene):
    from blender_sd_addon.blender import project

    scene.sdtex_project.controlnet = ""
    labels = [text for kind, text, _ in draw(project.SDTEX_PT_project, scene) if kind == "label"]
    assert "Empty: SD 1.x depth ControlNet" in labels  # the tests' tiny model is an SD 1.x
    assert "lllyasviel/sd-controlnet-depth (downloaded on first use)" in labels
    scene.sdtex_project.controlnet = "/models/my_depth_cn"
    assert not any("depth ControlNet" in text for kind, text, _ in draw(project.SDTEX_PT_project, scene))


def test_the_solid_shading_hint_shows_only_while_a_viewport_is_in_solid_shading(scene, quiet, monkeypatch):
    """The hint used to be part of the saved message and stayed after the artist switched to Material Preview."""
    ui_state.STATE.say("Saved 1 file in /textures (seed 3)")
    ui_state.STATE.applied = True
    solid = [SimpleNamespace(type="SOLID")]
    monkeypatch.setattr(panels, "solid_viewports", lambda: solid)
    shown = draw(panels.MainPanel, scene)
    assert ("operator", "sdtex.material_preview", None) in shown
    assert "Solid shading" in text(shown)
    solid.clear()  # the artist pressed Z
    shown = draw(panels.MainPanel, scene)
    assert ("operator", "sdtex.material_preview", None) not in shown
    assert "Solid shading" not in text(shown) and "Saved 1 file" in text(shown)


def text(drawn: list) -> str:
    """The labels drawn, as one text (messages wrap over several labels)."""
    return " ".join(item[1] for item in drawn if item[0] == "label")
