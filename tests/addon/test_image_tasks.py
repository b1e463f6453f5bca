"""Image tasks from Blender (api.img2img, inpaint, upscale, make_seamless and sdtex.image_task), in real
Blender (bpy 5.0 as a module) with the real backend worker and tiny models: 64 px, 2 steps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

bpy = pytest.importorskip("bpy")
from blender_sd_addon import api, jobs  # noqa: E402
from blender_sd_addon.blender import own_message, tasks, ui_jobs, ui_state  # noqa: E402
from blender_sd_addon.history import HistoryRecord  # noqa: E402

SIZE = 64
FAST = {"steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def tiny_inpaint_model_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionInpaintPipeline folder (9-channel U-Net, random weights, seed 0)."""
    from backend.tiny_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-inpaint") / "tiny-inpaint", architecture="tiny-inpaint")


@pytest.fixture
def png_file(tmp_path) -> str:
    """A 64 px gradient (it does not tile) on disk."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, np.full_like(x, 90)], -1).astype(np.uint8)
    path = tmp_path / "plaster.png"
    Image.fromarray(rgb).save(path)
    return str(path)


def add_cube(name: str = "Cube"):
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    obj = bpy.context.active_object
    obj.name = name
    return obj


def pixels_of(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def blender_pixels(image) -> np.ndarray:
    values = np.empty(len(image.pixels), dtype=np.float32)
    image.pixels.foreach_get(values)
    return values


def painted(name: str, rgba: np.ndarray):
    """An unsaved image holding `rgba` (uint8, rows top to bottom), as if painted in Blender."""
    height, width = rgba.shape[:2]
    image = bpy.data.images.new(name, width, height, alpha=True)
    image.pixels.foreach_set((np.flipud(rgba).astype(np.float32) / 255).ravel())  # Blender: bottom row first
    return image


def albedo_of(material):
    return next(n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.name == "Albedo")


def test_img2img_of_an_unsaved_painted_image_makes_new_images_and_a_material(scene):
    rgba = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    source = painted("Painted", rgba)
    before = blender_pixels(source)
    cube = add_cube()

    result = api.img2img(source, "mossy stone", [cube], strength=0.5, resize="keep", pbr=True, **FAST)

    # New images (never the source), applied with their maps; the source is untouched and still unsaved.
    (image,) = result.images
    assert image != source and image.size[:] == (SIZE, SIZE) and Path(image.filepath).is_file()
    assert set(result.maps[0]) == {"height", "normal", "roughness", "ao"}
    (material,) = result.materials
    assert cube.active_material == material and albedo_of(material) == image
    np.testing.assert_array_equal(blender_pixels(source), before)
    assert source.is_dirty and source.filepath == "" and source.packed_file is None
    assert result.result.params["image"].keys() == {"sha256"}  # unsaved: sent as bytes

    record = HistoryRecord.from_fields(scene.sdtex.history[0])
    assert (record.task, record.source, record.seed) == ("img2img", "Painted", 3)
    assert record.title == "Variation of Painted: mossy stone" and record.params["strength"] == 0.5
    assert "image" not in record.params and record.images()[0].path == result.files[0]


@pytest.mark.parametrize("model", ["plain", "9-channel"])
def test_inpaint_with_a_mask_painted_in_blender_keeps_every_pixel_outside_it(
    scene, png_file, tiny_inpaint_model_dir, model
):
    # White = repaint, painted into a new Blender image: a block near the top of the picture.
    mask_top_first = np.zeros((SIZE, SIZE), dtype=bool)
    mask_top_first[8:24, 20:44] = True
    grey = np.where(mask_top_first, 255, 0).astype(np.uint8)
    mask = painted("Mask", np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    source = bpy.data.images.load(png_file)
    cube = add_cube()

    chosen = str(tiny_inpaint_model_dir) if model == "9-channel" else None
    result = api.inpaint(source, "moss", mask, [cube], mask_blur=2, model=chosen, **FAST)

    out, original = pixels_of(result.files[0]), pixels_of(png_file)
    # Farther than mask_blur from the mask, every byte is the source's; inside, the model painted.
    near = ndimage.binary_dilation(mask_top_first, iterations=3)
    np.testing.assert_array_equal(out[~near], original[~near])
    assert (out[mask_top_first] != original[mask_top_first]).any()
    assert albedo_of(cube.active_material) == result.images[0] != source
    record = HistoryRecord.from_fields(scene.sdtex.history[0])
    assert (record.task, record.source, record.mask, record.params["mask_blur"]) == (
        "inpaint",
        "plaster.png",
        "Mask",
        2,
    )


def test_upscale_and_make_seamless_give_new_images(scene, png_file):
    source = bpy.data.images.load(png_file)
    cube = add_cube()

    bigger = api.upscale(source, [cube], scale=2, prompt="plaster", strength=0.5, **FAST)
    assert bigger.images[0].size[:] == (2 * SIZE, 2 * SIZE) and albedo_of(cube.active_material) == bigger.images[0]

    tiled = api.make_seamless(png_file, prompt="plaster", seamless="x", band_width=16, mask_blur=0, **FAST)
    out, original = pixels_of(tiled.files[0]), pixels_of(png_file)
    assert tiled.images[0] != source and tiled.materials == []  # no objects: nothing applied
    # Only a band over the left/right wrap-around seam changes: the middle columns are the source's.
    np.testing.assert_array_equal(out[:, 8:-8], original[:, 8:-8])
    assert (out[:, :8] != original[:, :8]).any()
    assert [HistoryRecord.from_fields(e).task for e in scene.sdtex.history] == ["make_seamless", "upscale"]


def test_bad_input_is_reported_naming_the_parameter(scene, png_file, tmp_path):
    with pytest.raises(api.SDTexError, match="strength must be a number from 0 to 1, got 1.5"):
        api.img2img(png_file, "moss", strength=1.5)
    with pytest.raises(api.SDTexError, match="img2img has no parameter 'strenght'"):
        api.img2img(png_file, "moss", strenght=0.5)
    with pytest.raises(api.SDTexError, match="prompt must be a non-empty string"):
        api.make_seamless(png_file, prompt="")
    with pytest.raises(api.SDTexError, match="mask: mask_from is image but no mask image was given"):
        api.inpaint(png_file, "moss")
    with pytest.raises(api.SDTexError, match="mask must be a bpy.types.Image or an image file path; no such file"):
        api.inpaint(png_file, "moss", str(tmp_path / "nothing.png"))
    with pytest.raises(api.SDTexError, match="displacement must be one of BUMP, DISPLACEMENT"):
        api.upscale(png_file, [add_cube()], displacement="PARALLAX")
    # Checked by the worker, which names the parameter too.
    with pytest.raises(api.BackendError, match="mask: the mask is 8x8 pixels but the image is 64x64") as caught:
        api.inpaint(png_file, "moss", bpy.data.images.new("Small", 8, 8), **FAST)
    assert caught.value.code == "invalid_params"
    assert not scene.sdtex.history


def test_operator_runs_the_chosen_task_in_background_mode_and_reports_errors(scene, png_file):
    settings = scene.sdtex
    cube = add_cube()
    cube.select_set(True)
    source = bpy.data.images.load(png_file)
    settings.image_task = "OUTPAINT"
    settings.inpaint.extend_right = 16
    settings.random_seed, settings.seed = False, 5

    assert bpy.ops.sdtex.image_task(image=source.name) == {"FINISHED"}

    image = albedo_of(cube.active_material)
    assert image != source and image.size[:] == (SIZE + 16, SIZE)
    np.testing.assert_array_equal(pixels_of(bpy.path.abspath(image.filepath))[:, :SIZE], pixels_of(png_file))
    record = HistoryRecord.from_fields(settings.history[0])
    assert (record.task, record.params["mask_from"], record.seed) == ("inpaint", "none", 5)

    settings.image_task = "INPAINT"  # mask_from image, and no mask image chosen
    # In the menus' words, under the Image Tasks panel's button (not on the main panel's line)
    with pytest.raises(RuntimeError, match="Mask From is Image but .* set Mask From to Alpha, Rectangle or Off"):
        bpy.ops.sdtex.image_task(image=source.name)
    assert own_message.MESSAGES["sdtex.image_task"].startswith("mask: Mask From is Image")
    with pytest.raises(RuntimeError, match="No image to start from: show one in the Image Editor"):
        bpy.ops.sdtex.image_task()
    settings.image_task, settings.img2img.strength, settings.steps = "VARIATIONS", 0.5, 1  # each fine alone
    with pytest.raises(RuntimeError, match="strength 0.5 with 1 steps runs no denoising step"):
        bpy.ops.sdtex.image_task(image=source.name)


def test_history_of_an_image_task_applies_again_and_restores_its_settings(scene, png_file):
    settings = scene.sdtex
    api.inpaint(png_file, "old brick", mask_from="rect", mask_x=4, mask_y=8, mask_width=16, mask_height=16,
                seamless="auto", mask_blur=1, **FAST)  # fmt: skip
    settings.image_task, settings.prompt, settings.steps = "UPSCALE", "something else", 7
    settings.inpaint.mask_from, settings.inpaint.mask_x, settings.inpaint.seamless = "image", 0, "none"

    assert bpy.ops.sdtex.use_history_settings() == {"FINISHED"}
    assert (settings.image_task, settings.prompt, settings.steps, settings.seed) == ("INPAINT", "old brick", 2, 3)
    group = settings.inpaint
    assert (group.mask_from, group.mask_x, group.mask_width, group.seamless, group.mask_blur) == (
        "rect",
        4,
        16,
        "auto",
        1,
    )

    cube = add_cube()
    cube.select_set(True)
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    record = HistoryRecord.from_fields(settings.history[0])
    assert bpy.path.abspath(albedo_of(cube.active_material).filepath) == record.images()[0].path
    assert cube.active_material.name == "SD Inpainted plaster.png: old brick"


def follow_ui_jobs():
    """Drive the UI timer by hand (timers do not tick in background mode) until it stops."""

    while (delay := ui_jobs._tick()) is not None:
        time.sleep(delay)
    ui_jobs.stop_polling()


def test_ui_job_uploads_an_unsaved_source_and_mask_then_applies_by_the_timer(scene):

    rgba = np.full((SIZE, SIZE, 4), 200, dtype=np.uint8)
    source = painted("Wall Paint", rgba)
    grey = np.zeros((SIZE, SIZE), dtype=np.uint8)
    grey[:, 40:] = 255
    mask = painted("Wall Mask", np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    cube = add_cube()
    params = tasks.task_params("inpaint", {"prompt": "ivy", **FAST})
    started = ui_jobs.start_ui_input_job(
        "inpaint", {"image": source, "mask": mask}, params, [cube], tasks.apply_options(), apply=True
    )
    assert isinstance(started, ui_state.Upload)
    follow_ui_jobs()

    assert not ui_state.STATE.is_error, ui_state.STATE.message
    assert ui_state.STATE.message.startswith("Saved 1 file in ") and "(seed 3)" in ui_state.STATE.message
    image = albedo_of(cube.active_material)
    assert image not in (source, mask)
    record = HistoryRecord.from_fields(scene.sdtex.history[0])
    assert (record.source, record.mask) == ("Wall Paint", "Wall Mask")
    assert isinstance(ui_state.STATE.board, jobs.JobBoard)


class RecordingLayout:
    """Stands in for a UILayout: records the properties drawn, and checks that each exists."""

    def __init__(self, drawn: list):
        self.drawn = drawn
        self.enabled = True

    def prop(self, data, name, **kwargs):
        getattr(data, name)  # AttributeError for a control that is not there
        self.drawn.append(name)

    def prop_search(self, data, name, search_data, search_name, **kwargs):
        self.prop(data, name)

    def operator(self, idname, **kwargs):
        self.drawn.append(idname)
        return type("Properties", (), {})()

    def label(self, **kwargs):
        pass

    def row(self, **kwargs):
        return self

    column = box = split = row


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("VARIATIONS", ["seamless", "resize", "strength"]),
        ("INPAINT", ["seamless", "resize", "mask_from", "mask", "mask_blur", "strength"]),
        ("OUTPAINT", ["extend_left", "extend_right", "extend_top", "extend_bottom", "outpaint_fill"]),
        ("UPSCALE", ["scale", "strength", "seamless"]),
        ("MAKE_SEAMLESS", ["seamless", "band_width", "mask_blur", "strength"]),
    ],
)
def test_the_panel_draws_each_tasks_own_controls_from_its_table(scene, mode, expected):
    from blender_sd_addon.blender.panels import SDTEX_PT_image_tasks

    scene.sdtex.image_task = mode
    drawn: list = []
    space = type("Space", (), {"image": bpy.data.images.new("Shown", 8, 8)})()
    region = type("Region", (), {"width": 280})()
    context = type("Context", (), {"scene": scene, "space_data": space, "region": region})()
    SDTEX_PT_image_tasks.draw(type("Panel", (), {"layout": RecordingLayout(drawn)})(), context)

    assert drawn[:2] == ["image_task", "prompt"] and drawn[-1] == "sdtex.image_task"
    own = drawn[2:-1]
    assert all(name in own for name in expected), own
    assert not {"model", "device", "image", "output_dir", "steps", "seed"} & set(own)  # filled in elsewhere
    if mode != "OUTPAINT":
        assert not any(name.startswith("extend_") for name in own)
    if mode == "INPAINT":  # a rectangle mask: its four numbers instead of the mask image
        scene.sdtex.inpaint.mask_from = "rect"
        drawn.clear()
        SDTEX_PT_image_tasks.draw(type("Panel", (), {"layout": RecordingLayout(drawn)})(), context)
        assert "mask" not in drawn and {"mask_x", "mask_y", "mask_width", "mask_height"} <= set(drawn)
