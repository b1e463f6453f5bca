"""The remote backend's path policy, walked over every path-like parameter of every task (TASK_PARAMS): a
relative name resolves inside --models-dir, everything else is refused with one message, whether it exists or
not. No server: the Policy is what the server applies to each request before the worker sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.remote_policy import Policy
from sdtex_contract import protocol


def path_params() -> list[tuple[str, str, protocol.Param, str | None]]:
    """(method, task, param, list it is an item of) for every path-like parameter, load_model's included."""
    found = []
    tables = [(protocol.RUN, task, table) for task, table in protocol.TASK_PARAMS.items()]
    for method, task, table in [*tables, (protocol.LOAD_MODEL, "", protocol.MODEL_PARAMS)]:
        for param in table:
            found += [(method, task, item, param.name) for item in param.items if item.path]
            if param.path:
                found.append((method, task, param, None))
    return found


def request(task: str, param: protocol.Param, within: str | None, value: str) -> dict:
    entry = {param.name: value}
    return {"task": task, **({within: [entry]} if within else entry)}


def shown_name(param: protocol.Param, within: str | None) -> str:
    return f"{within}[0].{param.name}" if within else param.name


@pytest.fixture
def places(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    models = tmp_path / "models"
    (models / "depth-controlnet").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root")
    (secret / "sub").mkdir()
    (secret / "sub" / "passwd").write_text("root")
    (models / "link").symlink_to(secret)
    monkeypatch.chdir(tmp_path)  # "secret/sub/passwd" exists relative to the working folder, not in models
    return {"models": models, "secret": secret}


def test_every_path_like_parameter_is_marked():
    """A new parameter that takes a path (PATH_MAX long) cannot slip past the policy unmarked."""
    for task, table in protocol.TASK_PARAMS.items():
        for param in (p for entry in table for p in (entry, *entry.items)):
            if param.kind is str and param.max_length == protocol.PATH_MAX:
                assert param.path, f"{task}.{param.name} takes a path but has no Param.path mark"
    assert {p.name for _, _, p, _ in path_params()} >= {
        "model", "upscaler_model", "controlnet", "resume_from", "photos_dir", "path", "models_dir", "output_dir",
    }  # fmt: skip


def test_outside_models_dir_is_refused_the_same_whether_it_exists_or_not(places: dict[str, Path]):
    policy = Policy(places["models"].parent / "out", (places["models"],))
    secret = places["secret"]
    outside = {
        "exists": str(secret / "passwd"),
        "missing": str(secret / "nopass"),
        "a link out, exists": "link/passwd",
        "a link out, missing": "link/nopass",
        "up, exists": "../secret/passwd",
        "up, missing": "../secret/nopass",
        "home": "~/passwd",
    }
    checked = 0
    for method, task, param, within in path_params():
        name = shown_name(param, within)
        messages = set()
        for value in outside.values():
            with pytest.raises(protocol.ProtocolError) as info:
                policy.check(method, request(task, param, within, value))
            assert info.value.code == protocol.INVALID_PARAMS and info.value.data["param"] == name, (task, name)
            messages.add(str(info.value).replace(protocol.shown(value), "VALUE"))
        assert len(messages) == 1, (task, name, messages)  # one message: nothing tells existing from missing
        checked += 1
        if param.path == protocol.WRITES:
            continue
        # A relative name means the models folder, never the working folder where "secret/sub/passwd" exists.
        resolved = policy.check(method, request(task, param, within, "secret/sub/passwd"))
        value = resolved[within][0][param.name] if within else resolved[param.name]
        assert value == str(places["models"] / "secret" / "sub" / "passwd"), (task, name)
    assert checked >= 20


def test_a_controlnet_inside_models_dir_is_accepted(places: dict[str, Path]):
    models = places["models"]
    policy = Policy(models.parent / "out", (models,))
    inside = str(models / "depth-controlnet")
    for value in (inside, "depth-controlnet"):
        checked = policy.check(protocol.RUN, {"task": "project", "controlnet": value, "model": "tiny"})
        assert checked["controlnet"] == inside
    hub = policy.check(protocol.RUN, {"task": "project", "controlnet": "lllyasviel/control_v11f1p_sd15_depth"})
    assert hub["controlnet"] == "lllyasviel/control_v11f1p_sd15_depth"


def test_without_models_dir_only_hub_ids_pass(tmp_path: Path):
    policy = Policy(tmp_path / "out")
    assert policy.check(protocol.LOAD_MODEL, {"model": "owner/name"})["model"] == "owner/name"
    with pytest.raises(protocol.ProtocolError, match="none: the server has no --models-dir"):
        policy.check(protocol.RUN, {"task": "train_lora", "resume_from": "run.ckpt"})
