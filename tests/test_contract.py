"""The contract package: typed parameter classes in step with the specs, one runner per spec."""

from __future__ import annotations

import typing

import pytest

from sdtex_contract import protocol, typed, typed_gen


def test_typed_classes_are_what_the_generator_writes():
    written = typed_gen.TARGET.read_text(encoding="utf-8")
    assert written == typed_gen.source(), "typed.py is stale: run python -m sdtex_contract.typed_gen"


@pytest.mark.parametrize("task", protocol.TASKS)
def test_each_typed_class_has_its_tables_types(task):
    """Fields and defaults: tests/backend/test_params.py; here the annotations editors read."""
    cls = typed.PARAMS_CLASSES[task]
    hints = typing.get_type_hints(cls)
    for p in protocol.SPECS[task].table:
        if p.kind in (str, int, float, bool):
            assert hints[p.name] is p.kind or p.kind in typing.get_args(hints[p.name]), p.name
        elif p.kind is list:
            assert typing.get_origin(hints[p.name]) is list, p.name


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
