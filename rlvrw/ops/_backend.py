"""Which implementation runs a call, and what is installed (for bug reports and bench results).

Three backends implement the ops: ``reference`` (plain PyTorch, ``rlvrw.reference``), ``triton`` (``rlvrw.kernels``)
and ``cuda`` (the kernels of ``csrc/`` for the ops listed in ``CUDA_OPS``: the C++ extension ``rlvrw._C``, or where it
was not built the same kernels compiled with NVRTC through cupy, ``rlvrw._C_cupy``). Per call:

1. ``backend=`` given to the op wins; else the ``RLVRW_BACKEND`` environment variable; else automatic.
2. Automatic: CPU tensors use ``reference``; CUDA tensors use ``cuda`` when the extension has the op and was measured
   faster on this GPU for this problem size (timed once per size class, see ``faster``), else ``triton``.
3. ``triton`` on CPU tensors runs the kernels in Triton's interpreter and needs ``TRITON_INTERPRET=1`` in the
   environment before ``rlvrw.kernels`` is first imported (that is how CI tests every kernel without a GPU).
4. ``RLVRW_BACKEND=cuda`` applies to the ops that have a CUDA version; the others use ``triton``. An explicit
   ``backend="cuda"`` for an op without one is an error.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "RLVRW_BACKEND"
CUDA_OPS = frozenset({
    "token_logprobs", "linear_token_logprobs", "grpo_loss_from_logits",
    "fsq_quantize", "fsq_codes_to_indices", "fsq_indices_to_codes", "fsq_dequantize",
})


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_extension_loaded() -> bool:
    from rlvrw import _C_loader

    return _C_loader.load()


def resolve(
    op: str,
    device: torch.device,
    backend: str | None = None,
    race: Callable[[str], Callable[[], object]] | None = None,
    race_key: tuple = (),
) -> str:
    """The backend that runs ``op`` on tensors on ``device``; raises ValueError for a request that cannot run.

    ``race(name)`` returns a side-effect-free callable that runs the op's main pass on backend ``name`` with the
    caller's inputs: automatic choice on a GPU times ``triton`` against ``cuda`` with it (see ``faster``), once per
    ``race_key``.
    """
    explicit = backend is not None
    name = backend if explicit else os.environ.get(ENV_VAR) or None
    source = "backend" if explicit else ENV_VAR
    if name is None:
        if device.type != "cuda":
            return "reference"
        if op in CUDA_OPS and race is not None and cuda_extension_loaded():
            key = (op, device.index) + race_key
            return faster(key, {"triton": race("triton"), "cuda": race("cuda")})
        return "triton"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "cuda":
        if op not in CUDA_OPS:
            if explicit:
                raise ValueError(f"backend='cuda': {op} has no CUDA version; CUDA ops: {sorted(CUDA_OPS)}")
            name = "triton"
        elif device.type != "cuda":
            raise ValueError(f"{source}='cuda' needs CUDA tensors, got tensors on {device}")
        elif not cuda_extension_loaded():
            from rlvrw import _C_loader

            raise ValueError(f"{source}='cuda' but neither rlvrw._C nor its cupy fallback is available: "
                             f"{_C_loader.LOAD_ERROR}")
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            f"{source}='triton' on CPU tensors needs TRITON_INTERPRET=1 set before rlvrw.kernels is imported"
        )
    return name


_FASTER: dict[tuple, str] = {}


def faster(key: tuple, candidates: dict[str, Callable[[], object]], repeats: int = 3) -> str:
    """The name of the fastest side-effect-free callable, timed with CUDA events on first sight of ``key``.

    The answer is cached per process. During CUDA graph capture nothing is timed (it would break the capture) and the
    first candidate is returned uncached.
    """
    if key in _FASTER:
        return _FASTER[key]
    names = list(candidates)
    if torch.cuda.is_current_stream_capturing():
        return names[0]
    best, best_ms = names[0], float("inf")
    for name in names:
        fn = candidates[name]
        fn()  # warm-up: compilation and autotuning stay out of the timing
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms < best_ms:
            best, best_ms = name, ms
    _FASTER[key] = best
    return best


def size_class(n: int) -> int:
    """Problem sizes that share a timing decision: powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def report() -> dict:
    """Versions and devices: paste this into a bug report; bench results carry it."""
    from rlvrw import __version__, _C_loader

    info = {
        "rlvrw": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu: " + (platform.processor() or platform.machine()),
        "cuda_extension": _C_loader.load(),
        "cuda_extension_error": _C_loader.LOAD_ERROR,
        "cuda_backend": _C_loader.BACKEND,
        "backend_override": os.environ.get(ENV_VAR),
        "triton_interpret": triton_interpreted(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"not importable: {err}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["device"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def format_report() -> str:
    return "\n".join(f"{key:22s} {value}" for key, value in report().items())
