"""The contract package: typed parameter classes in step with the specs, one runner per spec."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sdtex_contract import protocol, typed, typed_gen


def test_typed_classes_are_what_the_generator_writes():
    written = typed_gen.TARGET.read_text(encoding="utf-8")
    assert written == typed_gen.source(), "typed.py is stale: run python -m sdtex_contract.typed_gen"


@pytest.mark.parametrize("task", protocol.TASKS)
def test_each_typed_class_has_its_tables_fields_types_and_defaults(task):
    cls = typed.PARAMS_CLASSES[task]
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    assert [f.name for f in fields] == [p.name for p in protocol.SPECS[task].table]
    for f, p in zip(fields, protocol.SPECS[task].table, strict=True):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert value == (list(p.default) if p.kind is list else p.default), f.name
        if p.kind in (str, int, float, bool):
            assert p.kind in typing.get_args(hints[f.name]) or hints[f.name] is p.kind, f.name


def test_a_request_becomes_its_tasks_typed_class():
    params = protocol.task_params({"task": "pbr", "image": {"path": "/a.png"}, "seamless": "xy", "output_dir": "/o"})
    assert type(params) is typed.PbrParams and params.seamless == "xy" and params.normal_format == "opengl"


def test_every_spec_has_one_runner_and_a_runner_needs_a_spec():
    from backend import registry
    from backend.tasks import TASKS

    assert set(TASKS) == set(protocol.SPECS)
    with pytest.raises(ValueError, match="no spec"):
        registry.runs("no_such_task")(lambda ctx, params: None)
    with pytest.raises(ValueError, match="two runners"):
        registry.runs("txt2img")(lambda ctx, params: None)
    assert TASKS["txt2img"].__module__ == "backend.tasks.txt2img"  # the real runner is still the registered one


def test_the_cli_commands_come_from_the_specs():
    from backend.__main__ import COMMANDS, build_parser

    assert COMMANDS == {s.command: name for name, s in protocol.SPECS.items() if s.command}
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(COMMANDS) <= set(commands)
