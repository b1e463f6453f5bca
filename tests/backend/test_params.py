"""Validation of generate parameters and the wire helpers (protocol.py), as the worker relies on them."""

from __future__ import annotations

import dataclasses

import pytest

from sdtex_contract import protocol
from sdtex_contract.protocol import GENERATE_PARAMS, GenerateParams, ProtocolError

VALID = {"model": "/models/tiny", "prompt": "mossy stone wall", "output_dir": "/tmp/out"}

# One or more bad values for every parameter that has any; each must be refused naming the parameter.
BAD_VALUES = {
    "task": ["img2img", 3],
    "model": ["", "   ", 7, "/models/\x00tiny"],
    "prompt": ["", None, "\ud800 lone surrogate", "x" * (protocol.TEXT_MAX + 1)],
    "negative_prompt": [5, "\udfff"],
    "seed": [-1, 2**32, 1.5, "7", True],
    "steps": [0, 151, 2.0, True],
    "guidance_scale": [-0.1, 30.5, float("nan"), float("inf"), "7", 10**400],
    "width": [63, 2056, 100, 512.0],
    "height": [56, 4096, 65],
    "batch_size": [0, 9],
    "scheduler": ["k_lms", ""],
    "speed": ["fastest", "", True],
    "preview_decoder": [7, "/taesd/\x00x", "x" * (protocol.PATH_MAX + 1)],
    "seamless": ["both", True],
    "pbr": ["yes", 1],
    "normal_format": ["vulkan"],
    "normal_method": ["marigold", ""],
    "height_method": ["depth"],
    "roughness_method": [True],
    "metallic_method": ["classical"],  # no filter makes metallic: none or model only
    "delight": ["on"],
    "depth_model": [5, "/models/\x00depth"],
    "normals_model": ["n" * (protocol.PATH_MAX + 1)],
    "intrinsics_model": [None],
    "estimate_steps": [-1, 51],
    "ensemble_size": [0, 11],
    "processing_resolution": [-8, 2056, 100],
    "normal_strength": [-1.0, 10.5],
    "height_contrast": [-0.1, 4.5],
    "roughness_contrast": [-0.1, 4.5],
    "ao_strength": [-1.0, 10.5],
    "output_dir": ["", 3, "/tmp/\x00", "/" + "d" * protocol.PATH_MAX],
    "filename_prefix": [None, 4],
    "preview_every": [-1, 151],
    "device": ["tpu"],
    "dtype": ["fp8", "float16"],
    "cpu_offload": ["true", 0],
    "channels_last": ["yes", True, "channels_last"],
    "compile": ["true", 1],
    "attention_slicing": [1],
    "vae_tiling": [None],
    "allow_pickle": ["no"],
    "loras": ["style.safetensors", {"model": "a"}, [{"model": "a"}] * (protocol.LORAS_MAX + 1)],
}


def test_every_parameter_has_bad_values():
    assert set(BAD_VALUES) == {p.name for p in GENERATE_PARAMS}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in BAD_VALUES.items() for v in values])
def test_bad_value_is_refused_naming_the_parameter(name, value):
    with pytest.raises(ProtocolError) as info:
        GenerateParams.from_dict({**VALID, name: value})
    assert info.value.code == protocol.INVALID_PARAMS
    assert info.value.data["param"] == name
    assert info.value.message.startswith(name)


def test_defaults_and_coercion():
    params = GenerateParams.from_dict({**VALID, "guidance_scale": 3, "seed": None, "unknown_field": 1})
    assert params.guidance_scale == 3.0 and isinstance(params.guidance_scale, float)
    assert params.seed is None
    assert params.steps == 25 and params.scheduler == "euler_a" and params.width == 512


def test_params_must_be_an_object():
    with pytest.raises(ProtocolError) as info:
        GenerateParams.from_dict(["prompt"])
    assert info.value.code == protocol.INVALID_REQUEST


def test_wire_round_trip_and_errors():
    message = protocol.request("r1", protocol.RUN, {"prompt": "ü"})
    assert protocol.decode(protocol.encode(message)) == message
    assert protocol.encode(message).endswith(b"\n") and protocol.encode(message).count(b"\n") == 1
    deep = b"[" * 100_000 + b"]" * 100_000
    for line in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"id": NaN}', b'{"x": -Infinity}', deep):
        with pytest.raises(ProtocolError) as info:
            protocol.decode(line)
        assert info.value.code == protocol.PARSE_ERROR
    with pytest.raises(ProtocolError) as info:
        protocol.check_protocol_version(protocol.PROTOCOL_VERSION + 1)
    assert info.value.code == protocol.PROTOCOL_MISMATCH


def test_error_replies_stay_short_and_encodable():
    """A bad value is shown, not echoed: a 10 MB value or a lone surrogate must not make the reply huge or
    unencodable (the worker used to die encoding such a reply)."""
    for value in ("x" * 10_000_000, "\ud800", float("nan"), 10**400):
        with pytest.raises(ProtocolError) as info:
            GenerateParams.from_dict({**VALID, "prompt": value})
        line = protocol.encode(protocol.error("r", info.value))
        assert len(line) < 1000


def test_each_task_has_its_generated_dataclass():
    for task, table in protocol.TASK_PARAMS.items():
        cls = protocol.PARAMS_CLASSES[task]
        fields = {f.name: f for f in dataclasses.fields(cls)}  # (TABLE is a ClassVar, not a field)
        assert list(fields) == [p.name for p in table]
        # list parameters: a fresh list each (default_factory), not a shared one
        assert all(fields[p.name].default == p.default for p in table if p.kind is not list)
        assert all(fields[p.name].default_factory() == list(p.default) for p in table if p.kind is list)
    pbr = protocol.task_params({"task": "pbr", "image": {"path": "/a.png"}, "output_dir": "/o"})
    assert isinstance(pbr, protocol.PbrParams) and pbr.image == {"path": "/a.png"} and not hasattr(pbr, "prompt")
    with pytest.raises(ProtocolError) as info:
        protocol.task_params({"task": "paint"})
    assert info.value.data["param"] == "task"


@pytest.mark.parametrize(
    ("value", "param"),
    [
        (None, "image"),
        ("/a.png", "image"),
        ({"path": "/a.png", "sha256": "0" * 64}, "image"),
        ({"sha256": "ABC"}, "image.sha256"),
        ({"path": ""}, "image.path"),
        ({"path": "/a\x00.png"}, "image.path"),
    ],
)
def test_bad_image_references_are_named(value, param):
    with pytest.raises(ProtocolError) as info:
        protocol.task_params({"task": "pbr", "image": value, "output_dir": "/o"})
    assert info.value.data["param"] == param


def test_array_references():
    param = protocol.Param("depth", protocol.ArrayInput, None, "depth", required=True)
    ok = param.check({"sha256": "a" * 64, "dtype": "float32", "shape": [64, 64]})
    assert ok == {"sha256": "a" * 64, "dtype": "float32", "shape": [64, 64]}
    for bad, name in [
        ({"sha256": "a" * 64, "dtype": "float64", "shape": [4]}, "depth.dtype"),
        ({"sha256": "a" * 64, "dtype": "float32", "shape": []}, "depth.shape"),
        ({"sha256": "a" * 64, "dtype": "float32", "shape": [0, 4]}, "depth.shape"),
        ({"sha256": "a" * 64, "dtype": "float32", "shape": [True]}, "depth.shape"),
    ]:
        with pytest.raises(ProtocolError) as info:
            param.check(bad)
        assert info.value.data["param"] == name


# --- list parameters (LoRAs, keyframes): each entry checked against its own table ----------------------

LIST_PARAM = protocol.Param(
    "loras", list, (), "LoRAs to apply.",
    items=(
        protocol.Param("model", str, "", "File, folder or hub id.", required=True),
        protocol.Param("weight", float, 1.0, "Strength.", protocol.Range(-4.0, 4.0)),
    ),
    max_items=3,
)  # fmt: skip


def test_list_param_fills_item_defaults_and_converts_ints():
    assert LIST_PARAM.check([{"model": "a"}, {"model": "b", "weight": 2}]) == [
        {"model": "a", "weight": 1.0},
        {"model": "b", "weight": 2.0},
    ]


@pytest.mark.parametrize(
    "value, named",
    [
        ({"model": "a"}, "loras must be a list of at most 3"),
        ([{"model": "a"}] * 4, "loras must be a list of at most 3"),
        ([{"model": "a"}, "b"], "loras[1] must be an object with model, weight"),
        ([{"model": "a", "scale": 1}], "loras[0] must be only the fields model, weight"),
        ([{"weight": 1.0}], "loras[0].model must be a non-empty string"),
        ([{"model": "a"}, {"model": "b", "weight": 9.0}], "loras[1].weight must be a number from -4 to 4"),
    ],
)
def test_list_param_names_the_bad_entry(value, named):
    with pytest.raises(protocol.ProtocolError) as err:
        LIST_PARAM.check(value)
    assert err.value.message.startswith(named)


def test_list_param_spec_lists_its_item_specs():
    spec = LIST_PARAM.to_wire()
    assert (spec["type"], spec["max_items"], spec["default"]) == ("list", 3, [])
    assert [item["name"] for item in spec["items"]] == ["model", "weight"]
    assert spec["items"][1]["range"] == {"low": -4.0, "high": 4.0, "multiple": 0}
