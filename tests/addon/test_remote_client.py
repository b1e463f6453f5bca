"""The add-on with a remote backend: the headless API through `python -m backend serve --listen` started here
must give the same pixels as the local worker, with the files written locally; and the client's pieces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from remote_server_process import ServerProcess

from blender_sd_addon.blender import session  # noqa: E402
from blender_sd_addon.remote import RemoteSettings, write_new
from blender_sd_addon.rpc import SDTexError
from blender_sd_addon.transport import parse_address


@pytest.fixture(scope="module")
def remote(tiny_model_dir: Path, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("remote-config"), "--models-dir", str(tiny_model_dir.parent))
    yield server
    server.close()


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def add_cube(name: str, x: float = 0.0):
    import bpy

    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(x, 0.0, 0.0))
    bpy.context.active_object.name = name
    return bpy.context.active_object


def texture_paths(obj) -> list[str]:
    import bpy

    nodes = obj.active_material.node_tree.nodes
    return sorted(bpy.path.abspath(n.image.filepath) for n in nodes if n.type == "TEX_IMAGE")


def test_headless_api_through_a_remote_server_gives_the_local_pixels(scene, remote: ServerProcess, tmp_path: Path):
    from blender_sd_addon import api

    settings = dict(seed=42, steps=2, width=64, height=64, pbr=True, seamless="xy")
    variation = dict(strength=0.5, seed=3, steps=2, width=64, height=64)
    here, there = tmp_path / "local", tmp_path / "remote"
    local = api.generate_texture([add_cube("Local")], "oak planks", output_dir=str(here), **settings)
    local_variation = api.img2img(local.files[0], "moss", output_dir=str(here), **variation)
    api.configure_remote(remote.address, remote.token)
    try:
        cube = add_cube("Remote", 2.0)
        far = api.generate_texture([cube], "oak planks", output_dir=str(there), **settings)
        assert session.current_client().remote == RemoteSettings(remote.address, remote.token)
        # an input given by its path on this machine is uploaded
        far_variation = api.img2img(local.files[0], "moss", output_dir=str(there), **variation)
    finally:
        api.configure_remote(None)
    assert session.get_client().remote is None  # back to the local worker

    assert len(far.files) == len(local.files) == 5  # albedo and four maps
    for mine, theirs in zip(local.files + local_variation.files, far.files + far_variation.files, strict=True):
        assert Path(theirs).parent == there
        assert np.array_equal(pixels(mine), pixels(theirs)), theirs
    assert texture_paths(cube) == sorted(far.files)  # the material uses the local copies
    assert cube.active_material == far.materials[0]
    server_outputs = {p.name for p in (remote.config / "outputs").iterdir()}
    assert {Path(f).name for f in far.files + far_variation.files} <= server_outputs


def test_preferences_remote_and_test_connection(scene, addon, remote: ServerProcess, tiny_model_dir: Path):
    import bpy

    from blender_sd_addon.blender import remote as remote_ui

    addon.backend_mode, addon.remote_address, addon.remote_token = "REMOTE", remote.address, remote.token
    try:
        assert session.remote_settings() == RemoteSettings(remote.address, remote.token)
        assert bpy.ops.sdtex.test_connection() == {"FINISHED"}
        message = remote_ui.STATE["message"]
        assert message.startswith("Connected: ") and "device cpu" in message and tiny_model_dir.name in message
        addon.remote_token = "wrong"
        with pytest.raises(RuntimeError, match="unauthorized"):
            bpy.ops.sdtex.test_connection()
    finally:
        addon.backend_mode = "LOCAL"
    assert session.remote_settings() is None


def test_a_wrong_token_is_a_clear_error(scene, remote: ServerProcess):
    from blender_sd_addon import api

    api.configure_remote(remote.address, "not-the-token")
    try:
        with pytest.raises(api.BackendError, match="unauthorized: wrong token"):
            api.load_model(timeout=30)
    finally:
        api.configure_remote(None)


def test_write_new_never_overwrites_nor_leaves_the_folder(tmp_path: Path):
    first = write_new(tmp_path, "a.png", b"1")
    second = write_new(tmp_path, "a.png", b"2")
    escaped = write_new(tmp_path / "out", "../../etc/passwd", b"3")
    assert (first.name, second.name) == ("a.png", "a_1.png")
    assert first.read_bytes() == b"1" and second.read_bytes() == b"2"
    assert escaped.parent == tmp_path / "out" and escaped.read_bytes() == b"3"
    assert not any(name.startswith(".sdtex-partial") for name in os.listdir(tmp_path))


def test_remote_settings_from_the_environment_and_bad_addresses(tmp_path: Path):
    env = {"SDTEX_REMOTE": "gpu-box:7860", "SDTEX_REMOTE_TOKEN": "t0k", "SDTEX_REMOTE_TLS": "1"}
    assert RemoteSettings.from_env(env) == RemoteSettings("gpu-box:7860", "t0k", tls=True)
    assert RemoteSettings.from_env({}) is None
    assert parse_address("[::1]:8000") == ("::1", 8000)
    for bad in ("gpu-box", "gpu-box:http", ":80", "host:70000"):
        with pytest.raises(SDTexError, match="HOST:PORT"):
            RemoteSettings(bad)
    with pytest.raises(SDTexError, match="certificate file does not exist"):
        RemoteSettings("host:1", cafile=str(tmp_path / "missing.pem"))


def test_batch_texture_selected_objects_applies_each_objects_own_prompt(scene):
    import bpy


    scene.sdtex.random_seed, scene.sdtex.seed = False, 7
    plain, named = add_cube("Wall"), add_cube("Floor", 2.0)
    named["sdtex_prompt"] = "polished marble"
    for obj in (plain, named):
        obj.select_set(True)
    assert bpy.ops.sdtex.batch_texture(template="{name} of mossy bricks") == {"FINISHED"}

    [manifest] = Path(session.output_folder(None)).glob("batch-*/jobs.jsonl")
    jobs = {job["id"]: job for job in map(json.loads, manifest.read_text().splitlines())}
    prompts = {key: job["prompt"] for key, job in jobs.items()}
    assert prompts == {"Wall": "Wall of mossy bricks", "Floor": "polished marble"}
    for obj in (plain, named):
        [path] = texture_paths(obj)  # its own job's image (the pixels equal a lone run's: tests/backend)
        assert Path(path).parent == manifest.parent / obj.name and pixels(path).shape == (64, 64, 3)
        record = json.loads((manifest.parent / obj.name / "result.json").read_text())
        assert (record["params"]["prompt"], record["result"]["seed"]) == (prompts[obj.name], 7)
