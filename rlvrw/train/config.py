"""Run settings as dataclasses whose fields are also command-line flags; shared by ``rlvrw pretrain`` and ``rlvrw rl``.

A config class is a dataclass deriving from ``RunConfig`` that declares each field with
``option(default, help, **argparse_kwargs)`` (and optionally has ``check_inputs``, for the files a run reads and
writes); its ``__post_init__`` calls ``RunConfig.__post_init__`` first, which checks every field's type against its
annotation (``rlvrw.usage.check_types``: a bool is true or false, numbers are finite) and the value of every field
declared with ``choices``. ``add_arguments`` gives it
``--config FILE`` (JSON) plus one flag per field; flags override the file. ``config_command`` makes a whole subcommand
of it; a bad setting, in the file or in a flag, is one error line naming the key and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from dataclasses import field
from pathlib import Path
from typing import Callable

from rlvrw import checks, usage
from rlvrw.usage import ArgumentParser, UsageError, check_types, run_command

# fields that may differ between a checkpoint and the run that resumes it
BOOKKEEPING_FIELDS = frozenset({"stop_at_step", "progress", "tensorboard", "log_every", "resume", "keep_checkpoints",
                                "on_nonfinite"})


class RunConfig:
    """``from_dict`` / ``to_dict`` for the dataclass settings of a run (they go into checkpoints as JSON)."""

    def __post_init__(self):
        check_types(self)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("argparse", {}).get("choices")
            if choices is not None:
                checks.choice(f.name, getattr(self, f.name), choices)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"config has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_token_cache(name: str, value) -> None:
    """``value`` (the setting ``name``) names a token cache: a non-empty .npz file or a directory holding some."""
    usage.existing_path(name, value, "a token cache: an .npz file or a directory of them", "*.npz")


def check_model_dir(name: str, value) -> None:
    """``value`` (the setting ``name``) names a model directory, with its config.json."""
    usage.existing_dir(name, value, "a model directory (config.json and model.safetensors)", "config.json")


def print_summary(summary: dict) -> None:
    """Print a run's summary as JSON once: in the single process, or in torchrun's rank 0 (asked of torchrun's
    environment, since the process group is gone by the time a run returns)."""
    from rlvrw.train import distributed

    launch = distributed.torchrun_environment()
    if launch is None or launch[0] == 0:
        print(json.dumps(summary, indent=2))


def option(default, help: str, **argparse_kwargs):
    """A config field with its command-line help (and argparse settings where its default cannot tell them)."""
    factory = {"default_factory": lambda: dict(default)} if isinstance(default, dict) else {"default": default}
    return field(**factory, metadata={"help": help, "argparse": argparse_kwargs})


def add_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """``--config FILE`` (JSON of ``config_cls`` fields) and one flag per field; flags override the file."""
    parser.add_argument("--config", help="JSON file of settings (the fields below, underscores in names)")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(f.metadata["argparse"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hints.get(f.name) in (bool, bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs and default is not None:
            kwargs["type"] = type(default)
        help_text = f"{f.metadata['help']} (default: {default})"
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kwargs)
    parser.add_argument("--out", dest="out_dir", default=argparse.SUPPRESS, help="the same as --out-dir")


def config_from_args(args: argparse.Namespace, config_cls):
    """The ``config_cls`` that ``--config`` and the flags describe, its ``check_inputs`` passed. Every error is a
    ``UsageError``: a ValueError from the config class's checks is about a setting by construction."""
    values = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config: no such file {str(path)!r}")
        try:
            values = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"--config: {path} is not valid JSON ({err})") from err
        if not isinstance(values, dict):
            raise UsageError(f"--config: {path} must hold a JSON object of settings")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values.update({name: value for name, value in vars(args).items() if name in fields})
    try:
        config = config_cls.from_dict(values)
        if hasattr(config, "check_inputs"):
            config.check_inputs()
    except UsageError:
        raise
    except ValueError as err:  # the class's own checks (check_types has passed: the values have the right types)
        raise UsageError(str(err)) from err
    return config


def config_differences(saved: dict, config) -> list[str]:
    """The fields whose values differ between a checkpoint's config and this run's, bookkeeping fields aside."""
    current = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as they were saved
    return sorted(k for k in current if k not in BOOKKEEPING_FIELDS and k in saved and saved[k] != current[k])


def config_command(name: str, help: str, doc: str, config_cls, run: Callable[[object], int]):
    """``(add_cli, main)`` for the subcommand ``rlvrw NAME``: its flags come from ``config_cls``, and
    ``run(config)`` does the work and returns the exit code. Bad settings raise ``UsageError``, which ``rlvrw``'s
    main prints as one error line, exit code 2. ``main(argv)`` is the same command for ``python -m`` (what torchrun
    launches), with the same error handling."""
    description = doc.split("\n\n")[0]

    def run_cli(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return run(config_from_args(args, config_cls))

    def add_cli(subparsers) -> None:
        parser = subparsers.add_parser(name, help=help, description=description)
        add_arguments(parser, config_cls)
        parser.set_defaults(func=run_cli)

    def main(argv: list[str] | None = None) -> int:
        parser = ArgumentParser(prog=f"rlvrw {name}", description=description)
        add_arguments(parser, config_cls)
        args = parser.parse_args(argv)
        return run_command(f"rlvrw {name}", lambda: run_cli(args))

    return add_cli, main
