"""Bad user input, told in one line: the errors a command reports without a traceback, and the checks that raise them.

``UsageError`` is a ``ValueError`` whose message names the flag or config key (or the file) at fault and what was
expected. The ``rlvrw`` command (``run_command``) prints it as one line on stderr and exits with 2; any other
exception is a bug and keeps its traceback. ``RLVRW_DEBUG=1`` shows the traceback of a ``UsageError`` too.
``MissingDependencyError`` is the ``UsageError`` (and ``ImportError``) of an optional package that is not installed;
``require`` imports one or raises it, naming the extra that installs it. ``TrainingStopped`` is a run that stopped
itself (``rlvrw.guard``): one line, exit code 1.

``ArgumentParser`` makes argparse's own errors (an unknown flag, a value that does not parse) one line too.

``check_types`` validates a dataclass's fields against their annotations (``int``, ``float``, ``bool``, ``str``,
``dict``, ``list``, ``tuple[X, Y]``, ``X | None``): a bool is ``True``/``False`` and never a string or a number, an
int is never a bool, a float is a finite int or float. Standard library only, so every layer may import this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "RLVRW_DEBUG"


class UsageError(ValueError):
    """Bad user input: a flag, a config key or a file the user named. The message names it and what was expected."""


class MissingDependencyError(ImportError, UsageError):
    """An optional package that the requested feature needs is not installed; the message says how to install it."""


class TrainingStopped(RuntimeError):
    """A run stopped itself before doing harm (a non-finite loss or gradient); the message says where and why."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (and its subcommands' parsers), with a flag error as one line: '{prog}: error: {message}
    (see {prog} --help)', exit code 2, instead of the whole usage text before it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def require(module: str, feature: str, package: str, extra: str | None = None):
    """``import module``, or a ``MissingDependencyError``: '{feature} needs {package} (pip install {package}, or
    rlvrw[{extra}])'."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and not (module == err.name or module.startswith(f"{err.name}.")):
            raise  # the package is there but one of its own imports is missing: its traceback says which
        how = f"pip install {package}" + (f", or rlvrw[{extra}]" if extra else "")
        raise MissingDependencyError(f"{feature} needs {package} ({how})") from err


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """``command()``'s exit code; a ``UsageError`` becomes one line on stderr and 2, a ``TrainingStopped`` one line
    and 1 (tracebacks with ``RLVRW_DEBUG=1``). Every other exception propagates with its traceback."""
    try:
        return int(command() or 0)
    except (UsageError, TrainingStopped) as err:
        if debug():
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


# ---- values ----------------------------------------------------------------------------------------------------------
def _describe(hint) -> str:
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {bool: "true or false", int: "an int", float: "a finite number", str: "a string", dict: "an object (dict)",
            list: "a list"}.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (tuple, list)) and len(value) == len(args) \
            and all(_matches(v, a) for v, a in zip(value, args))
    if origin in (list, dict):
        return isinstance(value, origin)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not know: left to the class's own checks


def check_types(instance) -> None:
    """Every field of the dataclass ``instance`` must match its annotation (see the module doc); UsageError naming
    the first that does not. Numbers nested in dicts and lists must be finite too."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not _matches(value, hints.get(f.name, typing.Any)):
            raise UsageError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        bad = _non_finite(value)
        if bad is not None:
            raise UsageError(f"{f.name} must hold finite numbers, got {bad!r} in {value!r}")


def _non_finite(value):
    """The first non-finite float in ``value`` (nested in lists, tuples and dicts), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for child in children:
        bad = _non_finite(child)
        if bad is not None:
            return bad
    return None


# ---- paths -----------------------------------------------------------------------------------------------------------
def existing_file(name: str, value, what: str = "a file") -> Path:
    """``value`` names an existing, non-empty file."""
    path = Path(value) if value else None
    if path is None:
        raise UsageError(f"{name} is required: {what}")
    if not path.exists():
        raise UsageError(f"{name} must be {what}; no such file: {str(path)!r}")
    if not path.is_file():
        raise UsageError(f"{name} must be {what}, got the directory {str(path)!r}")
    if path.stat().st_size == 0:
        raise UsageError(f"{name} must be {what}, got an empty (0-byte) file: {str(path)!r}")
    return path


def existing_dir(name: str, value, what: str = "a directory", pattern: str | None = None) -> Path:
    """``value`` names an existing directory (holding a file matching ``pattern`` when given)."""
    path = Path(value) if value else None
    if path is None:
        raise UsageError(f"{name} is required: {what}")
    if not path.exists():
        raise UsageError(f"{name} must be {what}; no such directory: {str(path)!r}")
    if not path.is_dir():
        raise UsageError(f"{name} must be {what}, got the file {str(path)!r}")
    if pattern is not None and not any(p.is_file() for p in path.glob(pattern)):
        raise UsageError(f"{name} must be {what}, but {str(path)!r} holds no {pattern} file")
    return path


def existing_path(name: str, value, what: str, pattern: str) -> Path:
    """``value`` names an existing non-empty file, or a directory holding a file matching ``pattern``."""
    if value and Path(value).is_dir():
        return existing_dir(name, value, what, pattern)
    if value and not Path(value).exists():
        raise UsageError(f"{name} must be {what}; no such file or directory: {str(value)!r}")
    return existing_file(name, value, what)


def output_dir(name: str, value) -> Path:
    """``value`` may name a directory to write into: a missing path or a directory, not a file."""
    if not value:
        raise UsageError(f"{name} must be a directory path, got {value!r}")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{name} must be a directory, but {str(path)!r} is an existing file")
    return path


def output_file(name: str, value) -> Path:
    """``value`` may name a file to write: a missing path or a file, not a directory."""
    if not value:
        raise UsageError(f"{name} must be a file path, got {value!r}")
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"{name} must be a file path, but {str(path)!r} is a directory")
    return path
