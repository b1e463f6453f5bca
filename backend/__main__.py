"""Command line: `python -m backend serve | generate | make-test-model | info` (also `sd-textures-backend`).

`generate` takes one flag per entry of protocol.GENERATE_PARAMS and validates exactly as the worker does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from blender_sd_addon.protocol import EVENT_PROGRESS, GENERATE_PARAMS, INVALID_PARAMS, GenerateParams, ProtocolError

ALIASES = {"guidance_scale": ["--guidance"], "batch_size": ["--batch"], "output_dir": ["--out"]}
CLI_DEFAULTS = {"output_dir": "./outputs"}


def _add_generate_flags(parser: argparse.ArgumentParser) -> None:
    for p in GENERATE_PARAMS:
        flags = ["--" + p.name.replace("_", "-"), *ALIASES.get(p.name, [])]
        default = CLI_DEFAULTS.get(p.name, p.default)
        kwargs: dict = {"dest": p.name, "default": default, "help": f"{p.help} Accepts {p.accepted()}."}
        if p.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = p.kind
            kwargs["metavar"] = p.name.upper()
            if p.choices:
                kwargs["choices"] = p.choices
                kwargs["metavar"] = "{" + ",".join(p.choices) + "}"
        kwargs["help"] += " Default: %(default)s."
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="Serve JSON lines on stdin/stdout (what the add-on starts).")
    _add_generate_flags(commands.add_parser("generate", help="Generate textures and print the written paths."))
    make = commands.add_parser("make-test-model", help="Write a seeded random-weight model folder (tests).")
    make.add_argument("dir", type=Path)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--architecture", choices=("tiny", "sd15"), default="tiny")
    commands.add_parser("info", help="Print versions, devices and the Hugging Face cache folder.")
    return parser


class _ProgressBar:
    """Progress of a generate run on stderr."""

    def __call__(self, message: dict) -> None:
        if message.get("event") == EVENT_PROGRESS:
            data = message["data"]
            done = 30 * data["step"] // data["total"]
            bar = "#" * done + "." * (30 - done)
            end = "\n" if data["step"] == data["total"] else ""
            print(f"\rstep {data['step']}/{data['total']} [{bar}] {data['elapsed']:.1f}s", end=end, file=sys.stderr)


def generate(args: argparse.Namespace) -> int:
    values = {p.name: getattr(args, p.name) for p in GENERATE_PARAMS}
    values["output_dir"] = os.path.abspath(values["output_dir"])
    try:
        params = GenerateParams.from_dict(values)
    except ProtocolError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2

    from backend.worker import Worker, quiet_libraries

    quiet_libraries()
    try:
        result = Worker(_ProgressBar()).generate("cli", params)
    except ProtocolError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2 if exc.code == INVALID_PARAMS else 1
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
    for record in result.images:
        print(record.path)
        for path in record.maps.values():
            print(path)
    return 0


def info() -> int:
    import diffusers
    import torch
    import transformers

    from backend import __version__
    from backend.models import available_devices, hf_cache_dir

    print(f"backend {__version__}")
    print(f"torch {torch.__version__}")
    print(f"diffusers {diffusers.__version__}")
    print(f"transformers {transformers.__version__}")
    print(f"devices {', '.join(available_devices())}")
    print(f"hf_cache {hf_cache_dir()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from backend.worker import serve

        return serve()
    if args.command == "generate":
        return generate(args)
    if args.command == "make-test-model":
        from backend.tiny_model import make_test_model

        print(make_test_model(args.dir, seed=args.seed, architecture=args.architecture))
        return 0
    return info()


if __name__ == "__main__":
    sys.exit(main())
