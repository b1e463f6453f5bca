"""Estimated PBR maps on the add-on's Blender-free side: which estimators the chosen methods need, the setup line
that names a missing one, how a map's source reads in a label, and history records that keep the methods."""

from __future__ import annotations

from blender_sd_addon import messages, readiness
from blender_sd_addon.contract import protocol
from blender_sd_addon.history import PBR_METHOD_SETTINGS, HistoryRecord
from blender_sd_addon.readiness import Facts

READY = dict(running=True, device="cuda", torch_version="2.5.1", model="/models/tiny", model_state="folder")
NORMALS = "prs-eth/marigold-normals-v1-1"
INTRINSICS = "prs-eth/marigold-iid-appearance-v1-1"


def test_each_model_method_names_the_estimator_it_needs_and_classical_needs_none():
    classical = {name: protocol.param(name).default for name in readiness.METHOD_ESTIMATORS}
    assert readiness.estimators_needed(classical) == {}
    chosen = classical | {"normal_method": "model", "metallic_method": "model", "delight": True}
    assert readiness.estimators_needed(chosen) == {"normals": ["Normal"], "intrinsics": ["Metallic", "Delight"]}
    # Every estimator named is one the contract has a model setting for.
    assert {kind for _, kind in readiness.METHOD_ESTIMATORS.values()} == set(protocol.ESTIMATORS)


def test_an_estimator_not_on_disk_blocks_generate_by_name_and_a_ready_one_does_not():
    missing = (("Normal", NORMALS, "missing"), ("Roughness, Metallic", INTRINSICS, "cached"))
    ready = readiness.check(Facts(**READY, estimators=missing))
    assert ready.blocker == f"Estimator model not ready: {NORMALS} for Normal (not on disk)"
    assert ready.estimators in ready.lines
    assert ready.estimators.fixes == (readiness.DOWNLOAD_ESTIMATOR, readiness.SET_ESTIMATORS)

    there = (("Normal", NORMALS, "cached"), ("Metallic", "/models/iid", "folder"))
    assert readiness.check(Facts(**READY, estimators=there)).estimators is None
    assert readiness.check(Facts(**READY, estimators=(("Normal", NORMALS, "remote"),))).blocker == ""


def test_every_missing_estimator_is_named_and_only_a_hub_id_offers_download():
    line = readiness.estimator_line((("Height", "/models/depth", "partial"), ("Normal", "/models/n", "not_model")))
    assert line.text == (
        "Estimator models not ready: depth for Height (download incomplete); n for Normal (not a diffusers folder)"
    )
    assert line.fixes == (readiness.SET_ESTIMATORS,)  # folders cannot be downloaded


def test_an_estimators_download_shows_on_its_own_line_not_the_generators():
    downloading = dict(downloading=True, download_progress=0.25, download_text="Downloading 1 MB of 4 MB")
    ready = readiness.check(
        Facts(**READY, estimators=(("Normal", NORMALS, "missing"),), download_model=NORMALS, **downloading)
    )
    assert ready.model.ready and ready.model.progress is None
    assert ready.estimators.progress == 0.25 and ready.estimators.text.startswith(NORMALS)
    generator = Facts(**READY | {"model_state": "missing"}, download_model="/models/tiny", **downloading)
    assert readiness.check(generator).model.progress == 0.25


def test_map_sources_read_as_the_artist_knows_them():
    assert messages.source_label("classical") == "derived"
    assert messages.source_label(f"model:{NORMALS}") == "Marigold"
    assert messages.source_label("model:/models/my-normals-estimator") == "my-normals-estimator"
    line = messages.map_sources_line({"normal": f"model:{NORMALS}", "roughness": "classical", "ao": "classical"})
    assert line == "Normal: Marigold · Roughness: derived · AO: derived"


def result(task: str, params: dict) -> protocol.GenerateResult:
    sources = {"normal": f"model:{NORMALS}", "roughness": "classical", "albedo": f"model:{INTRINSICS}"}
    image = protocol.ImageRecord("/out/a.png", None, {"normal": "/out/n.png", "albedo": "/out/d.png"}, sources)
    return protocol.GenerateResult([image], None, 64, 64, "", "none", {}, params, task=task)


def test_a_pbr_record_keeps_its_map_sources_and_methods_through_the_panels_fields():
    methods = {"normal_method": "model", "metallic_method": "model", "delight": True, "ensemble_size": 3}
    params = protocol.PbrParams.from_dict({"image": {"path": "/in.png"}, "output_dir": "/out", **methods}).to_dict()
    record = HistoryRecord.from_result(result("pbr", params), source="Painted")

    class Fields:  # what the history entry PropertyGroup holds
        pass

    for name, value in record.to_fields().items():
        setattr(Fields, name, value)
    back = HistoryRecord.from_fields(Fields)
    assert back.images()[0].map_sources == result("pbr", params).images[0].map_sources
    assert back.delit_albedo() == "/out/d.png"
    settings = back.settings()
    assert {name: settings[name] for name in methods} == methods
    assert set(PBR_METHOD_SETTINGS) <= settings.keys() and "image" not in settings


def test_records_from_before_the_methods_restore_what_they_have():
    old = HistoryRecord.from_dict(
        {"prompt": "", "negative_prompt": "", "seed": None, "steps": 0, "guidance_scale": 0.0, "width": 8,
         "height": 8, "scheduler": "", "seamless": "x", "pbr": True, "model": "", "task": "pbr",
         "files": [{"path": "", "seed": None, "maps": {"normal": "/n.png"}}]}
    )  # fmt: skip
    assert old.images()[0].map_sources == {} and old.delit_albedo() == ""
    assert old.settings()["seamless"] == "x" and not set(PBR_METHOD_SETTINGS) & old.settings().keys()


def test_the_estimate_task_makes_maps_so_it_is_not_offered_as_an_image_task():
    from blender_sd_addon.history import IMAGE_TASKS

    # The Image Editor's task list repaints images; maps of an image come from its PBR panel's Model methods.
    assert "estimate" in protocol.TASK_PARAMS and "estimate" not in IMAGE_TASKS
    assert set(IMAGE_TASKS) == {"img2img", "inpaint", "make_seamless", "upscale"}
