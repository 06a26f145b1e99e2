"""Input checks for every layer: each raises ValueError naming the argument and what was expected (for an argument
of the wrong type ``ArgumentTypeError``, which is both a TypeError and a ValueError). The value checks (``number``,
``integer``, ``choice``) take ``error=`` for the class to raise instead, e.g. ``rlvrw.usage.UsageError`` where the
value is a flag the user typed. A leaf module: it imports torch and numpy only, so any module of rlvrw may use it.

Shape, dtype and option checks are free. Checks on values (token ids in range) need the data, which on a GPU means a
host sync; they run unless ``set_value_checks(False)`` (or ``RLVRW_VALUE_CHECKS=0``), which a training loop that
must not sync uses once its inputs are known good. They are skipped during CUDA graph capture.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_value_checks = os.environ.get("RLVRW_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor values (and so sync with a GPU) on or off for this process."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled(t: torch.Tensor) -> bool:
    return _value_checks and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def tensor(name: str, x, dims: tuple[int, ...] | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    return x


def shape(name: str, x: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but the other inputs are on {first}")
    return first


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A TypeError, and a ValueError too, so that callers written against the
    earlier checks (which raised ValueError for everything) still catch it."""


def _type_error(error: type[ValueError]) -> type[ValueError]:
    """The class for a value of the wrong type: ``ArgumentTypeError`` unless the caller asked for its own."""
    return ArgumentTypeError if error is ValueError else error


def choice(name: str, value, choices, *, error: type[ValueError] = ValueError):
    """``value`` must be one of ``choices`` (a bool never is). Returns it."""
    if isinstance(value, bool) or value not in choices:
        raise error(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def number(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    error: type[ValueError] = ValueError,
) -> float:
    """``value`` must be a real number (not a bool, not a string), not NaN, finite unless ``finite=False``, and in
    the interval given by ``low`` / ``high`` (closed unless ``low_open`` / ``high_open``). Returns it as a float."""
    if not _is_real(value):
        raise _type_error(error)(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    ok = not math.isnan(value) and (not finite or math.isfinite(value))
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        what = ("a finite number" if finite else "a number (not NaN)") + (" " + " and ".join(bounds) if bounds else "")
        raise error(f"{name} must be {what}, got {value!r}")
    return value


def positive(name: str, value, allow_zero: bool = False, *, error: type[ValueError] = ValueError) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``)."""
    return number(name, value, low=0, low_open=not allow_zero, error=error)


def integer(name: str, value, low: int = 1, high: int | None = None, *, error: type[ValueError] = ValueError) -> int:
    """``value`` must be an int (not a bool; numpy integers are fine) in [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise _type_error(error)(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        if high is not None:
            expected = f"an int in [{low}, {high}]"
        else:
            expected = "a positive int" if low == 1 else f"an int >= {low}"
        raise error(f"{name} must be {expected}, got {value!r}")
    return int(value)


def no_unknown_options(function: str, unknown: dict, known) -> None:
    for key in unknown:
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{function}: unknown option {key!r}{hint} Options: {sorted(known)}")


def token_ids(name: str, tokens: torch.Tensor, vocab: int, valid: torch.Tensor | None = None) -> None:
    """Token ids (an integer tensor, checked by ``tensor``) must lie in [0, vocab), only where ``valid`` if given."""
    if tokens.numel() == 0 or not value_checks_enabled(tokens):
        return
    checked = tokens if valid is None else tokens[valid]
    if checked.numel() and bool(((checked < 0) | (checked >= vocab)).any()):
        lo, hi = int(checked.min()), int(checked.max())
        raise ValueError(f"{name} must lie in [0, {vocab}) (the vocabulary size), got values in [{lo}, {hi}]")
