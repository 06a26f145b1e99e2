"""Finite scalar quantization: quantize (codes and indices in one pass), the code <-> index maps, and dequantization
through the tokenizer's 1x1 conv as one gather from a cached table.

Formulas and conventions (vector-quantize-pytorch's): ``rlvrw.reference.fsq``. Indices are int32 (every codebook this
accepts has at most 2^31 codes). Channel-last: the last dimension of ``z`` / ``codes`` has one entry per level.
"""

from __future__ import annotations

import collections
import threading
import types
import weakref
from typing import Sequence

import torch

from rlvrw import checks
from rlvrw.ops import _backend
from rlvrw.reference import fsq as R

MAX_CODEBOOK_SIZE = 2**31  # indices are int32: the largest is 2^31 - 1
MAX_LEVEL = 2**24  # codes k / (L // 2) in float32 map back to k exactly only while L // 2 < 2^23


def check_levels(levels) -> tuple[int, ...]:
    """levels as a tuple of ints; ValueError for an empty list, a level below 2 or above 2^24, a codebook over 2^31."""
    if isinstance(levels, torch.Tensor):
        levels = levels.tolist()
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError(f"levels must be a non-empty list of ints (levels per dimension), got {levels!r}")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int):
            raise ValueError(f"levels must hold ints, got {levels!r}")
        if not 2 <= level <= MAX_LEVEL:
            raise ValueError(f"levels must each lie in [2, 2^24] (a dimension needs 2 levels or more), got {levels!r}")
    size = R.codebook_size(levels)
    if size > MAX_CODEBOOK_SIZE:
        raise ValueError(f"levels {list(levels)} give {size} codes; at most 2^31 fit in int32 indices")
    return tuple(int(level) for level in levels)


def _check_last_dim(name: str, x: torch.Tensor, levels: tuple[int, ...]) -> None:
    if x.dim() == 0 or x.shape[-1] != len(levels):
        raise ValueError(
            f"{name} must have shape (..., {len(levels)}) (one entry per level of {list(levels)}), got {tuple(x.shape)}"
        )


def _check_indices_in_range(indices: torch.Tensor, levels: tuple[int, ...]) -> None:
    if indices.numel() == 0 or not checks.value_checks_enabled(indices):
        return
    size = R.codebook_size(levels)
    if bool(((indices < 0) | (indices >= size)).any()):
        lo, hi = int(indices.min()), int(indices.max())
        raise ValueError(
            f"indices must lie in [0, {size}) (the codebook size of levels {list(levels)}), got values in [{lo}, {hi}]"
        )


def _check_found(indices: torch.Tensor, name: str, what: str) -> None:
    """Index -1 marks an input outside the op's domain (see ``rlvrw.reference.fsq``)."""
    if indices.numel() and checks.value_checks_enabled(indices) and bool((indices < 0).any()):
        raise ValueError(f"{name} must {what}; {int((indices < 0).sum())} of {indices.numel()} do not")


# ----------------------------------------------------------------------------------------------------------------------
# Per-device constants shared by the kernels
# ----------------------------------------------------------------------------------------------------------------------

_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_CONSTANTS_LOCK = threading.Lock()


def kernel_constants(levels: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """(float (4, d) rows half_l, offset, shift, half_width in ``dtype``; int32 (2, d) rows levels, basis) on
    ``device``, computed once per (levels, dtype, device): a kernel launch then copies nothing from the host."""
    key = (levels, dtype, device)
    found = _CONSTANTS.get(key)
    if found is None:
        with _CONSTANTS_LOCK:
            floats = R.fsq_constants(levels, dtype).to(device)
            ints = torch.tensor([list(levels), R.fsq_basis(levels)], dtype=torch.int32).to(device)
            found = _CONSTANTS.setdefault(key, (floats, ints))
    return found


def _cuda_quantize(z, consts, ints):
    return torch.ops.rlvrw.fsq_quantize(z, consts, ints)


def _cuda_quantize_backward(z, grad_codes, consts, ints):
    return torch.ops.rlvrw.fsq_quantize_backward(z, grad_codes.to(z.dtype), consts)


def _cuda_codes_to_indices(codes, consts, ints):
    return torch.ops.rlvrw.fsq_codes_to_indices(codes, consts, ints)


def _cuda_indices_to_codes(indices, consts, ints, codebook_size, dtype):
    return torch.ops.rlvrw.fsq_indices_to_codes(indices, consts, ints, codebook_size, dtype)


def _cuda_gather(indices, table):
    return torch.ops.rlvrw.fsq_gather(indices, table)


# The CUDA extension's ops behind the launcher signatures of rlvrw.kernels.fsq (float32 / half inputs only).
_CUDA = types.SimpleNamespace(
    fsq_quantize=_cuda_quantize,
    fsq_quantize_backward=_cuda_quantize_backward,
    fsq_codes_to_indices=_cuda_codes_to_indices,
    fsq_indices_to_codes=_cuda_indices_to_codes,
    fsq_gather=_cuda_gather,
)


def _kernels(backend: str):
    if backend == "triton":
        from rlvrw.kernels import fsq

        return fsq
    return _CUDA


def _resolve(op: str, device: torch.device, dtype: torch.dtype, backend: str | None, main_pass, n_rows: int) -> str:
    """The backend for ``op``. On a GPU, Triton and CUDA are raced once per (op, dtype, size class) with
    ``main_pass(kernels)`` (side-effect free). The CUDA kernels compute in float32 only: float64 goes to Triton unless
    CUDA is asked for, which is then an error."""

    def race(name):
        return lambda: main_pass(_kernels(name))

    name = _backend.resolve(
        op, device, backend, race=None if dtype == torch.float64 else race,
        race_key=(dtype, _backend.size_class(n_rows)),
    )
    if name == "cuda" and dtype == torch.float64:
        if backend == "cuda":
            raise ValueError(f"backend='cuda': {op} computes in float32; float64 runs on 'triton' or 'reference'")
        return "triton"
    return name


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) as a 3-D view (B, S, d) without copying when the leading dims can merge that way (e.g. a channel-
    first tensor moved to channel-last), else a contiguous copy. The kernels walk rows (b, s) with these strides."""
    d = x.shape[-1]
    if x.dim() >= 2:
        try:
            return x.view(x.shape[0], -1, d)
        except RuntimeError:
            pass
    try:
        return x.view(1, -1, d)
    except RuntimeError:
        return x.reshape(1, -1, d)


# ----------------------------------------------------------------------------------------------------------------------
# fsq_quantize
# ----------------------------------------------------------------------------------------------------------------------


class FSQQuantizeFunction(torch.autograd.Function):
    """z (B, S, d) -> codes (B, S, d) with z's strides and dtype, indices (B, S) int32; straight-through backward."""

    @staticmethod
    def forward(ctx, z, levels, backend):
        kernels = _kernels(backend)
        acc = R.compute_dtype(z.dtype)
        consts, ints = kernel_constants(levels, acc, z.device)
        codes, indices = kernels.fsq_quantize(z, consts, ints)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(z)
        ctx.levels, ctx.kernels = levels, kernels
        return codes, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_codes, _grad_indices):
        (z,) = ctx.saved_tensors
        consts, ints = kernel_constants(ctx.levels, R.compute_dtype(z.dtype), z.device)
        return ctx.kernels.fsq_quantize_backward(z, grad_codes, consts, ints), None, None


def fsq_quantize(z: torch.Tensor, levels: Sequence[int], *, backend: str | None = None):
    """FSQ: z (..., d) with d = len(levels) -> (codes (..., d), indices (...,) int32), in one pass.

    codes = round(bound(z)) / (L // 2) in [-1, 1], in z's dtype (math in float32 for half / bfloat16 / float32 z,
    float64 for float64), with the straight-through gradient d codes / d z = bound'(z) / (L // 2). indices are the
    codes' positions in the codebook (see ``rlvrw.reference.fsq``), not differentiable. Any number of leading dims;
    a channel-first tensor moved to channel-last (``z.movedim(1, -1)``) is read in place, and its codes come back
    with the same strides, so ``codes.movedim(-1, 1)`` is contiguous again.
    """
    levels = check_levels(levels)
    checks.tensor("z", z)
    _check_last_dim("z", z, levels)
    acc = R.compute_dtype(z.dtype)
    name = _resolve(
        "fsq_quantize", z.device, z.dtype, backend,
        lambda k: k.fsq_quantize(_rows(z.detach()), *kernel_constants(levels, acc, z.device)), z.numel(),
    )
    if name == "reference":
        codes, indices = R.fsq_quantize(z, levels)
    else:
        codes, indices = FSQQuantizeFunction.apply(_rows(z), levels, name)
        codes, indices = codes.view(z.shape), indices.view(z.shape[:-1])
    _check_found(indices, "z", "be finite (NaN has no code)")
    return codes, indices


# ----------------------------------------------------------------------------------------------------------------------
# codes <-> indices
# ----------------------------------------------------------------------------------------------------------------------


def fsq_codes_to_indices(codes: torch.Tensor, levels: Sequence[int], *, backend: str | None = None) -> torch.Tensor:
    """codes (..., d) -> indices (...,) int32; each code snaps to its nearest level (the exact inverse of
    ``fsq_indices_to_codes`` on every code of the codebook, also for codes stored in bfloat16 / float16)."""
    levels = check_levels(levels)
    checks.tensor("codes", codes)
    _check_last_dim("codes", codes, levels)
    constants = (levels, R.compute_dtype(codes.dtype), codes.device)
    name = _resolve(
        "fsq_codes_to_indices", codes.device, codes.dtype, backend,
        lambda k: k.fsq_codes_to_indices(_rows(codes), *kernel_constants(*constants)), codes.numel(),
    )
    if name == "reference":
        indices = R.fsq_codes_to_indices(codes, levels)
    else:
        indices = _kernels(name).fsq_codes_to_indices(_rows(codes), *kernel_constants(*constants))
        indices = indices.view(codes.shape[:-1])
    _check_found(indices, "codes", f"be FSQ codes of levels {list(levels)} (each in [-1, 1], on the grid)")
    return indices


def fsq_indices_to_codes(
    indices: torch.Tensor,
    levels: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """indices (...,) int32 / int64 in [0, codebook_size) -> codes (..., d) in ``dtype`` (default float32)."""
    levels = check_levels(levels)
    checks.tensor("indices", indices, dtypes=checks.INDEX_DTYPES)
    if dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in checks.FLOAT_DTYPES]}, got {dtype}")
    _check_indices_in_range(indices, levels)
    flat = indices.reshape(-1)
    size = R.codebook_size(levels)
    constants = (levels, R.compute_dtype(dtype), indices.device)
    name = _resolve(
        "fsq_indices_to_codes", indices.device, dtype, backend,
        lambda k: k.fsq_indices_to_codes(flat, *kernel_constants(*constants), size, dtype), flat.numel(),
    )
    if name == "reference":
        return R.fsq_indices_to_codes(indices, levels, dtype)
    codes = _kernels(name).fsq_indices_to_codes(flat, *kernel_constants(*constants), size, dtype)
    return codes.view(*indices.shape, len(levels))


# ----------------------------------------------------------------------------------------------------------------------
# fsq_dequantize
# ----------------------------------------------------------------------------------------------------------------------


class _TableCache:
    """Dequantization tables, one per (levels, weight, bias) in use, rebuilt when either tensor changes.

    A table is reused while the same weight and bias objects (held by weak reference, so a freed tensor whose address
    is reused never matches) keep their data pointer and version counter: in-place updates (optimizer steps,
    ``load_state_dict``, ``copy_`` under ``no_grad``) bump the version and force a rebuild. Writes through ``.data``
    bypass the version counter; call ``clear_dequantize_cache()`` after those.
    """

    MAX_ENTRIES = 16  # (levels, weight, bias) combinations kept; each holds one table, the latest

    def __init__(self):
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _state(t: torch.Tensor | None) -> tuple:
        return (None,) if t is None else (t.data_ptr(), t._version, t.dtype, t.shape, t.device)

    def get(self, levels: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        key = (levels, id(weight), None if bias is None else id(bias))
        state = self._state(weight) + self._state(bias)
        with self._lock:
            entry = self._entries.get(key)
            if (
                entry is not None
                and entry[0]() is weight
                and (bias is None or entry[1]() is bias)
                and entry[2] == state
            ):
                self._entries.move_to_end(key)
                return entry[3]
        with torch.no_grad():
            table = padded_table(levels, weight, bias)
        with self._lock:  # replaces a stale table of the same tensors: one table per (levels, weight, bias)
            self._entries[key] = (weakref.ref(weight), None if bias is None else weakref.ref(bias), state, table)
            self._entries.move_to_end(key)
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
        return table

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def padded_table(levels: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The (codebook_size + 1, C) gather table: ``rlvrw.reference.fsq.fsq_dequantize_table`` plus a NaN row that every
    backend reads for an index outside the codebook (so no backend reads out of bounds and none hides a bad index)."""
    table = R.fsq_dequantize_table(levels, weight, bias)
    return torch.cat([table, table.new_full((1, table.shape[1]), float("nan"))])


_TABLES = _TableCache()


def clear_dequantize_cache() -> None:
    """Forget every cached dequantization table (needed only after writing weights through ``.data``)."""
    _TABLES.clear()


def _gather(name: str, table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """rows ``table[indices]`` (indices (M,)), an out-of-range index reading the NaN row (the table's last)."""
    if name == "reference":
        size = table.shape[0] - 1
        safe = torch.where((indices >= 0) & (indices < size), indices.long(), size)
        return table[safe]
    return _kernels(name).fsq_gather(indices, table)


class FSQDequantizeFunction(torch.autograd.Function):
    """indices (M,) -> (M, C) by a table gather; backward gives d(weight), d(bias) of the layer applied to the codes
    (the table is exact, so these are the gradients of codes -> layer)."""

    @staticmethod
    def forward(ctx, indices, weight, bias, levels, table, backend):
        ctx.save_for_backward(indices)
        ctx.levels, ctx.backend = levels, backend
        ctx.weight_shape, ctx.weight_dtype, ctx.has_bias = weight.shape, weight.dtype, bias is not None
        return _gather(backend, table, indices)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        acc = R.compute_dtype(ctx.weight_dtype)
        grad = grad_out.to(acc)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            codes = fsq_indices_to_codes(indices, ctx.levels, acc, backend=ctx.backend)
            grad_weight = (grad.t() @ codes).to(ctx.weight_dtype).view(ctx.weight_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(ctx.weight_dtype)
        return None, grad_weight, grad_bias, None, None, None


def fsq_dequantize(
    indices: torch.Tensor,
    levels: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """indices (...,) -> ``linear(fsq_indices_to_codes(indices), weight, bias)``: (..., C) in the weight's dtype.

    weight (C, d) (a linear layer's) or (C, d, 1, 1) (the tokenizer's 1x1 conv), bias (C,) or None. Done as one
    gather from a precomputed (codebook_size, C) table (exact: the layer is affine); the table is cached and rebuilt
    when the weight or bias changes (see ``_TableCache``); when gradients flow to them (training) it is rebuilt on
    every call. Differentiable in weight and bias. The output is channel-
    last; for a channel-first image ``out.permute(0, 3, 1, 2)`` is an NCHW view in channels_last memory format.
    """
    levels = check_levels(levels)
    checks.tensor("indices", indices, dtypes=checks.INDEX_DTYPES)
    checks.tensor("weight", weight, dims=(2, 4))
    d = len(levels)
    if weight.shape[1] != d or (weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)):
        raise ValueError(
            f"weight must have shape (C, {d}) or (C, {d}, 1, 1) (d = len(levels)), got {tuple(weight.shape)}"
        )
    if bias is not None:
        checks.tensor("bias", bias, dims=(1,))
        checks.shape("bias", bias, (weight.shape[0],), "(C,), C = weight.shape[0]")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias must have the weight's dtype ({weight.dtype}), got {bias.dtype}")
    device = checks.same_device(indices=indices, weight=weight, bias=bias)
    _check_indices_in_range(indices, levels)
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        # Training: the weights change every step anyway, and a fresh table (codebook_size x d x C multiply-adds)
        # cannot be stale whatever wrote the weights.
        with torch.no_grad():
            table = padded_table(levels, weight, bias)
    else:
        table = _TABLES.get(levels, weight, bias)
    flat = indices.reshape(-1)
    name = _resolve("fsq_dequantize", device, weight.dtype, backend, lambda k: k.fsq_gather(flat, table), flat.numel())
    out = FSQDequantizeFunction.apply(flat, weight, bias, levels, table, name)
    return out.view(*indices.shape, weight.shape[0])
