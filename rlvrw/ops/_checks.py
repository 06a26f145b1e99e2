"""Input checks shared by the ops: each raises ValueError naming the argument and what was expected.

Shape, dtype and option checks are free. Checks on values (token ids in range) need the data, which on a GPU means a
host sync; they run unless ``set_value_checks(False)`` (or ``RLVRW_VALUE_CHECKS=0``), which a training loop that
must not sync uses once its inputs are known good. They are skipped during CUDA graph capture.
"""

from __future__ import annotations

import difflib
import os

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


def choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def positive(name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def integer(name: str, value, low: int = 1) -> None:
    """``value`` must be an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        expected = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


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
