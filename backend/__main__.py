"""Command line: `python -m backend serve | generate | pbr | estimate | img2img | inpaint | upscale | make-seamless |
travel | train | make-test-model | info` (also `sd-textures-backend`).

Each task with a `command` in its spec (sdtex_contract/tasks.py; `generate` runs txt2img) is a command with
one flag per entry of its parameter table (image inputs take file paths: `--image PATH`, `--mask PATH`);
values are validated exactly as the worker does, and the job runs through the same Worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from sdtex_contract import protocol
from sdtex_contract.protocol import EVENT_DOWNLOAD, EVENT_PROGRESS, INVALID_PARAMS, ImageInput, ProtocolError
from sdtex_contract.units import transfer_text

ALIASES = {"guidance_scale": ["--guidance"], "batch_size": ["--batch"], "output_dir": ["--out"]}
# transformers' notice, logged on every import of diffusers, that its image processors fall back to PIL without
# torchvision: the backend uses none of them (no safety checker), so it is noise on every command.
TORCHVISION_NOTICE = ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to")


def user_data_dir() -> Path:
    """The per-user data folder + sd-textures: $XDG_DATA_HOME (else ~/.local/share), ~/Library/Application
    Support on macOS, %LOCALAPPDATA% on Windows."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "sd-textures"


# Defaults the CLI changes, computed when the parser is built: files go to the user's data folder, never into
# whatever folder the command runs in (a checkout, say).
CLI_DEFAULTS = {"output_dir": lambda: str(user_data_dir() / "outputs")}
COMMANDS = {spec.command: name for name, spec in protocol.SPECS.items() if spec.command}  # command -> task
COMMAND_HELP = {spec.command: spec.command_help or spec.help for spec in protocol.SPECS.values() if spec.command}


def _add_task_flags(parser: argparse.ArgumentParser, task: str) -> None:
    for p in protocol.TASK_PARAMS[task]:
        if p.name == "task":
            continue
        flags = ["--" + p.name.replace("_", "-"), *ALIASES.get(p.name, [])]
        default = CLI_DEFAULTS[p.name]() if p.name in CLI_DEFAULTS else p.default
        kwargs: dict = {"dest": p.name, "default": default, "help": f"{p.help} Accepts {p.accepted()}."}
        if p.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif p.kind is ImageInput:
            kwargs.update(metavar="PATH", required=p.required, help=f"{p.help} An image file.")
        elif p.kind is list:
            kwargs.update(type=json.loads, metavar="JSON", help=f"{p.help} Accepts JSON: {p.accepted()}.")
        else:
            kwargs["type"] = p.kind
            kwargs["metavar"] = p.name.upper()
            if p.choices:
                kwargs["choices"] = p.choices
                kwargs["metavar"] = "{" + ",".join(p.choices) + "}"
        kwargs["help"] += " Default: %(default)s."
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from backend.batch import add_arguments as add_batch_arguments
    from backend.server import add_arguments as add_server_arguments
    from backend.tiny_model import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Serve JSON lines on stdin/stdout (what the add-on starts), or TCP.")
    add_server_arguments(serve)
    for command, task in COMMANDS.items():
        _add_task_flags(commands.add_parser(command, help=COMMAND_HELP[command]), task)
    make = commands.add_parser("make-test-model", help="Write a seeded random-weight model folder (tests).")
    make.add_argument("dir", type=Path)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--architecture", choices=ARCHITECTURES, default="tiny")
    make.add_argument(
        "--controlnet-for", type=Path, metavar="MODEL_DIR", help="Write a depth ControlNet for this test model "
        "folder instead (for the project task without weights)."
    )  # fmt: skip
    commands.add_parser("info", help="Print versions, devices and the Hugging Face cache folder.")
    add_batch_arguments(commands.add_parser("batch", help="Run a manifest of jobs, here or on a Ray cluster."))
    return parser


class _Console:
    """Progress of a job on stderr; keeps the terminal reply."""

    reply: dict | None = None
    downloading = False  # a download's progress counts bytes: its `download` events say it better

    def __call__(self, message: dict) -> None:
        if protocol.is_terminal(message):
            self.reply = message
        elif message.get("event") == protocol.EVENT_ARTIFACT and message["data"]["kind"] == "checkpoint":
            print(f"\ncheckpoint: {message['data']['path']}", file=sys.stderr)
        elif message.get("event") == EVENT_DOWNLOAD:
            d, self.downloading = message["data"], True
            print(f"\r{transfer_text(d['bytes_done'], d['bytes_total'], d['speed'])}   ", end="", file=sys.stderr)
        elif message.get("event") == EVENT_PROGRESS and not self.downloading:
            data = message["data"]
            done = 30 * data["step"] // data["total"]
            bar = "#" * done + "." * (30 - done)
            end = "\n" if data["step"] == data["total"] else ""
            frame = f"frame {data['image_index'] + 1}/{data['frames']}, " if data.get("frames") else ""
            line = f"\r{frame}step {data['step']}/{data['total']} [{bar}] {data['elapsed']:.1f}s"
            if "loss" in data:  # train_lora
                line += f" loss {data['loss']:.4f} ~{data['seconds_left']:.0f}s left"
            print(line, end=end, file=sys.stderr)


def run_task(args: argparse.Namespace) -> int:
    task = COMMANDS[args.command]
    values = {p.name: getattr(args, p.name) for p in protocol.TASK_PARAMS[task] if p.name != "task"}
    values["task"] = task
    for name in ("output_dir", "photos_dir", "resume_from", "class_images_dir"):  # given relative to here
        if values.get(name):
            values[name] = os.path.abspath(values[name])
    for p in protocol.TASK_PARAMS[task]:
        if p.kind is ImageInput and values[p.name] is not None:
            values[p.name] = {"path": os.path.abspath(values[p.name])}
    try:
        protocol.task_params(values)
    except ProtocolError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2

    from backend.worker import Worker, quiet_libraries

    quiet_libraries()
    console = _Console()
    worker = Worker(console)

    def cancel(signum, frame) -> None:  # the first Ctrl-C cancels as a client would (train saves a checkpoint)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one aborts at once
        print("\ncancelling (Ctrl-C again to abort) ...", file=sys.stderr)
        worker.cancel_all()

    previous = signal.signal(signal.SIGINT, cancel)
    try:
        worker.handle(protocol.request("cli", protocol.RUN, values))
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    if console.reply.get("cancelled"):
        print("cancelled", file=sys.stderr)
        return 130
    if "error" in console.reply:
        error = console.reply["error"]
        print(f"error ({error['code']}): {error['message']}", file=sys.stderr)
        return 2 if error["code"] == INVALID_PARAMS else 1
    result = console.reply["result"]
    if "artifacts" not in result:  # a download or a listing: its result as JSON
        print(json.dumps(result, indent=2))
    for artifact in result.get("artifacts", ()):
        print(artifact["path"])
    if result.get("artifacts") and values.get("output_dir"):
        print(f"files written to {values['output_dir']}", file=sys.stderr)  # stdout keeps the paths alone
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
    logger, notice = TORCHVISION_NOTICE
    logging.getLogger(logger).addFilter(lambda record: notice not in record.getMessage())  # before any import
    args = build_parser().parse_args(argv)
    if args.command == "batch":
        from backend.batch import main as batch_main

        return batch_main(args)
    if args.command == "serve" and args.listen:
        from backend.server import serve_tcp

        return serve_tcp(args)
    if args.command == "serve":
        from backend.worker import serve

        return serve()
    if args.command in COMMANDS:
        return run_task(args)
    if args.command == "make-test-model":
        from backend.tiny_model import make_test_controlnet, make_test_model

        if args.controlnet_for is None:
            print(make_test_model(args.dir, seed=args.seed, architecture=args.architecture))
            return 0
        try:
            print(make_test_controlnet(args.dir, args.controlnet_for, seed=args.seed))
        except ValueError as exc:
            print(f"error: --controlnet-for: {exc}", file=sys.stderr)
            return 2
        return 0
    return info()


if __name__ == "__main__":
    sys.exit(main())
