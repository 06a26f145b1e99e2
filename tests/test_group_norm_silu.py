"""group_norm_silu: the reference against float64 GroupNorm + SiLU, the Triton kernels (every launch path: one tile,
tiled, split across programs; NCHW and channels_last) against the reference in float64 with gradients, half dtypes,
memory formats, input errors.

Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rlvrw.ops
from rlvrw.ops.group_norm_silu import group_norm_silu
from rlvrw.reference.group_norm_silu import group_norm_silu as reference_group_norm_silu

# (shape, groups, launch overrides): one tile; tiles along S (NCHW) or C (channels_last) with partial last tiles;
# S split across programs with a partial last slice.
PATHS = [
    pytest.param((2, 6, 5, 3), 3, {}, id="one-tile"),
    pytest.param((2, 6, 7, 9), 2, {"block_c": 2, "block_s": 8}, id="tiled"),
    pytest.param((1, 6, 7, 9), 3, {"split": 3, "block_c": 2, "block_s": 8}, id="split"),
]


def float64_reference(x, num_groups, weight, bias, eps, grad_out):
    """Output and gradients of sum(grad_out * silu(group_norm(x))) in float64 by autograd."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = F.silu(F.group_norm(leaves[0], num_groups, leaves[1], leaves[2], eps))
    grads = torch.autograd.grad((out * grad_out.double().cpu()).sum(), [t for t in leaves if t is not None])
    return out.detach(), grads


def make_inputs(shape, dtype, device, channels_last=False, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(dtype).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    move = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return x, move(weight), move(bias), grad_out.to(dtype).to(device)


def test_reference_is_group_norm_then_silu_with_float32_statistics():
    x, weight, bias, _ = make_inputs((2, 8, 4, 4), torch.bfloat16, "cpu")
    out = reference_group_norm_silu(x, 4, weight, bias, 1e-6)
    assert out.dtype == torch.bfloat16
    expect = F.silu(F.group_norm(x.double(), 4, weight.double(), bias.double(), 1e-6))
    torch.testing.assert_close(out.double(), expect, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("shape, groups, launch", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_kernels_match_float64(shape, groups, launch, channels_last, kernel_device):
    from rlvrw.kernels import group_norm_silu as K

    x, weight, bias, grad_out = make_inputs(shape, torch.float64, kernel_device, channels_last)
    x3 = x.view(shape[0], shape[1], -1)
    expect, (dx_ref, dw_ref, db_ref) = float64_reference(x, groups, weight, bias, 1e-6, grad_out)
    # Outputs go into NaN-poisoned views of larger buffers: every element written, nothing outside.
    y_buf = torch.full((shape[0], shape[1] + 1, x3.shape[2]), float("nan"), dtype=x.dtype, device=kernel_device)
    y, mean, rstd = K.group_norm_silu_forward(x3, groups, weight, bias, 1e-6, y_buf[:, 1:], **launch)
    assert not y.isnan().any() and y_buf[:, 0].isnan().all()
    torch.testing.assert_close(y.reshape(shape).cpu(), expect, rtol=1e-13, atol=1e-13)
    dx_buf = torch.full_like(y_buf, float("nan"))
    dx, dw, db = K.group_norm_silu_backward(
        grad_out.view(x3.shape), x3, groups, weight, bias, mean, rstd, True, dx_buf[:, :-1], **launch
    )
    assert not dx.isnan().any() and dx_buf[:, -1].isnan().all()
    torch.testing.assert_close(dx.reshape(shape).cpu(), dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw.cpu(), dw_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db.cpu(), db_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape, groups", [((3, 4), 2), ((2, 6, 11), 3), ((1, 4, 2, 3, 2), 1), ((1, 32, 2, 3), 32)], ids=str
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_op_any_spatial_rank_with_and_without_affine(shape, groups, affine, kernel_device):
    x, weight, bias, grad_out = make_inputs(shape, torch.float64, kernel_device, affine=affine)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = group_norm_silu(leaves[0], groups, *(leaves[1:] or [None, None]), eps=1e-5, backend="triton")
    grads = torch.autograd.grad((out * grad_out).sum(), leaves)
    expect, ref_grads = float64_reference(x, groups, weight, bias, 1e-5, grad_out)
    assert out.shape == shape
    torch.testing.assert_close(out.detach().cpu(), expect, rtol=1e-13, atol=1e-13)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-12, atol=1e-12)


def test_gradcheck_tiny(kernel_device):
    x, weight, bias, _ = make_inputs((1, 4, 3, 2), torch.float64, kernel_device)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda *a: group_norm_silu(a[0], 2, a[1], a[2], backend="triton"), inputs, fast_mode=True
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2**-7), (torch.float16, 2**-10)],
                         ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_low_precision_keeps_dtype_and_memory_format(dtype, tol, channels_last, kernel_device):
    x, weight, bias, grad_out = make_inputs((2, 8, 6, 5), dtype, kernel_device, channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = group_norm_silu(*leaves[:1], 4, *leaves[1:], backend="triton")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    grads = torch.autograd.grad((out * grad_out).sum(), leaves)
    # Same rounded inputs in float64: the kernel differs only by its float32 math and the final rounding.
    expect, ref_grads = float64_reference(x, 4, weight, bias, 1e-6, grad_out)
    torch.testing.assert_close(out.detach().cpu().double(), expect, rtol=tol, atol=tol)
    assert grads[0].dtype == dtype and grads[0].is_contiguous(memory_format=fmt)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), e, rtol=tol, atol=tol * e.abs().max().item())


def test_large_mean_does_not_cancel_the_variance(kernel_device):
    """x = 100 + 0.1 noise in float32: E[x^2] - E[x]^2 would be off by ~6% of the variance; Chan's merge is not."""
    g = torch.Generator().manual_seed(3)
    x = (100 + torch.randn(2, 4, 64, 64, generator=g, dtype=torch.float64) * 0.1).float().to(kernel_device)
    out = group_norm_silu(x, 2, backend="triton")
    expect = F.silu(F.group_norm(x.double().cpu(), 2, eps=1e-6))
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-3, atol=1e-3)


def test_nan_stays_in_its_group(kernel_device):
    x, weight, bias, _ = make_inputs((2, 6, 4, 4), torch.float32, kernel_device)
    x[1, 2, 3, 1] = float("nan")  # group 1 of sample 1
    out = group_norm_silu(x, 3, weight, bias, backend="triton").cpu()
    assert out[1, 2:4].isnan().all()
    out[1, 2:4] = 0
    assert not out.isnan().any()


def test_reference_backend_and_empty_inputs():
    x, weight, bias, _ = make_inputs((2, 6, 4, 4), torch.float32, "cpu")
    torch.testing.assert_close(group_norm_silu(x, 3, weight, bias), reference_group_norm_silu(x, 3, weight, bias))
    assert group_norm_silu(torch.zeros(0, 6, 4), 3, backend="reference").shape == (0, 6, 4)


def test_public_name_is_the_function():
    """Importing the module rlvrw.ops.group_norm_silu must not shadow the op of the same name in rlvrw.ops."""
    assert rlvrw.ops.group_norm_silu is group_norm_silu


def test_bad_inputs_name_the_argument():
    x = torch.zeros(2, 6, 4)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing the 6 channels"):
        group_norm_silu(x, 4)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm_silu(x, 0)
    with pytest.raises(ValueError, match="x must be \\(N, C, \\*\\)"):
        group_norm_silu(torch.zeros(6), 3)
    with pytest.raises(ValueError, match="x must have dtype"):
        group_norm_silu(x.long(), 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        group_norm_silu(x, 3, torch.ones(5))
    with pytest.raises(ValueError, match="bias must be 1-D"):
        group_norm_silu(x, 3, None, torch.ones(6, 1))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        group_norm_silu(x, 3, eps=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        group_norm_silu(x, 3, backend="cudnn")
