"""Fused GroupNorm + SiLU (the decoder's norm-activation pair), for NCHW and channels_last inputs.

Formulas: ``rlvrw.reference.group_norm_silu``. Statistics in float32 (float64 for float64 inputs); the output has the
input's dtype and memory format.
"""

from __future__ import annotations

import torch

from rlvrw import checks
from rlvrw.ops import _backend
from rlvrw.reference.group_norm_silu import group_norm_silu as reference_group_norm_silu


class GroupNormSiLUFunction(torch.autograd.Function):
    """x (N, C, S) viewed from (N, C, *) in its own layout -> y of the same shape and strides; backward gives dx,
    dweight, dbias from the saved x and per-(n, group) mean and rstd (x is re-normalized, not stored twice)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        from rlvrw.kernels import group_norm_silu as kernels

        y, mean, rstd = kernels.group_norm_silu_forward(x, num_groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        from rlvrw.kernels import group_norm_silu as kernels

        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = kernels.group_norm_silu_backward(
            grad_y, x, ctx.num_groups, weight, bias, mean, rstd,
            need_weight_grads=ctx.needs_input_grad[2] or ctx.needs_input_grad[3],
        )
        return (
            dx if ctx.needs_input_grad[0] else None,
            None,
            dweight if ctx.needs_input_grad[2] else None,
            dbias if ctx.needs_input_grad[3] else None,
            None,
        )


def channel_view(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, *) as (N, C, S) without a copy when its spatial dims merge (NCHW-contiguous and channels_last both
    do), else a contiguous copy; the kernels index (n, c, s) through the view's strides."""
    try:
        return x.view(x.shape[0], x.shape[1], -1)
    except RuntimeError:
        return x.reshape(x.shape[0], x.shape[1], -1)


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` in one read of x and one write of the output.

    x (N, C, *) in any float dtype and memory format (NCHW, channels_last, (N, C) alone); weight, bias (C,) or None.
    Statistics per (n, group) in float32 (float64 for float64 x), biased variance as ``F.group_norm``. The output
    has x's dtype, shape and strides (channels_last in, channels_last out). Differentiable in x, weight and bias.
    """
    checks.tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    checks.integer("num_groups", num_groups)
    if channels % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {channels} channels, got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            checks.tensor(name, t, dims=(1,))
            checks.shape(name, t, (channels,), "(C,), C = x.shape[1]")
    checks.number("eps", eps, low=0)
    device = checks.same_device(x=x, weight=weight, bias=bias)
    name = _backend.resolve("group_norm_silu", device, backend)
    if name == "reference" or x.numel() == 0:
        return reference_group_norm_silu(x, num_groups, weight, bias, float(eps))
    y = GroupNormSiLUFunction.apply(channel_view(x), num_groups, weight, bias, float(eps))
    return y.view(x.shape)
