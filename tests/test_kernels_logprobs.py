"""The Triton logits passes (kernels/logprobs.py) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the
kernels module is imported); with one, the same tests run compiled on CUDA tensors.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rlvrw.kernels import logprobs as K  # noqa: E402
from rlvrw.reference import logprobs as R  # noqa: E402

# Rows that are masked out, or that hold -inf, evaluate discarded where() branches as NaN under numpy.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (V, block_v, block_n): None lets the launcher choose; the explicit ones make the V loop run and pack several rows
# per program with a partial last group (N = 5).
SHAPES = [
    (1, None, None),
    (7, None, None),
    (130, None, None),
    (130, 64, 4),
    (1000, None, None),
    (1000, 256, 2),
    (4633, 1024, None),
]


def _tol(dtype):
    """(rtol, atol) of the kernel's fp32/fp64 math against the float64 reference on the same input values."""
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


def _grad_tol(dtype):
    """Tolerance of dlogits, which is rounded to the logits dtype on store."""
    return {
        torch.float64: (1e-10, 1e-12),
        torch.float32: (1e-5, 1e-6),
        torch.float16: (2e-3, 1e-5),
        torch.bfloat16: (1.6e-2, 1e-4),
    }[dtype]


def _logits(n, v, dtype, seed=0, scale=3.0, pad=0):
    """(n, v) logits in dtype; with pad > 0 a sliced view whose row stride is v + pad, the padding holding 777."""
    g = torch.Generator().manual_seed(seed)
    base = torch.full((n, v + pad), 777.0, dtype=torch.float64)
    base[:, :v] = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    base = base.to(dtype).to(DEVICE)
    return base[:, :v]


def _tokens(n, v, seed=1, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, v, (n,), generator=g).to(dtype).to(DEVICE)


def _close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape, what
    finite = torch.isfinite(expected)
    assert torch.isfinite(actual[finite]).all(), f"{what}: non-finite output where the reference is finite"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_forward(logits, tokens, inv_t, with_entropy, scale=1.0, **cfg):
    logp, lse, entropy = K.logits_forward(logits, tokens, inv_t, with_entropy, **cfg)
    ref_logp, ref_lse, ref_entropy = R.logits_forward(logits.double(), tokens, inv_t, with_entropy)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert logp.dtype == lse.dtype == acc
    rtol, atol = _tol(logits.dtype)
    atol = atol * scale  # absolute error of fp32 math grows with the size of the logits
    _close(logp, ref_logp, rtol, atol, "logp")
    _close(lse, ref_lse, rtol, atol, "lse")
    if with_entropy:
        assert entropy.dtype == acc
        _close(entropy, ref_entropy, rtol, atol, "entropy")
    else:
        assert entropy is None
    return logp, lse, entropy


# ----------------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v,block_v,block_n", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_matches_reference(dtype, v, block_v, block_n, temperature):
    logits = _logits(5, v, dtype)
    tokens = _tokens(5, v)
    for with_entropy in (False, True):
        _check_forward(logits, tokens, 1.0 / temperature, with_entropy, block_v=block_v, block_n=block_n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("token_dtype", [torch.int32, torch.int64], ids=str)
def test_forward_strided_rows_and_int32_tokens(dtype, token_dtype):
    logits = _logits(6, 1000, dtype, pad=24)
    assert logits.stride(0) == 1024 and not logits.is_contiguous()
    tokens = _tokens(6, 1000, dtype=token_dtype)
    _check_forward(logits, tokens, 1.0 / 0.7, True, block_v=256, block_n=4)
    _check_forward(logits, tokens, 1.0, True)
    # A non-contiguous token vector.
    tokens2 = torch.stack([tokens, tokens], 1)[:, 1]
    _check_forward(logits, tokens2, 1.0, False, block_v=128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_forward_extreme_logits(dtype):
    v = 1000
    logits = _logits(5, v, torch.float64, scale=10.0)
    logits[0, :] = 1e4
    logits[0, 17] = -1e4
    logits[1, ::2] = -1e4
    logits[1, 1::2] = 1e4
    logits[2, :] = -1e4
    logits[2, 500] = 1e4
    logits[3, :300] = float("-inf")  # the first blocks hold only -inf: the online rescaling must not NaN
    logits[3, 600:700] = float("-inf")
    logits[4, 1::3] = float("-inf")
    logits = logits.to(dtype)
    tokens = torch.tensor([17, 3, 500, 900, 3], device=DEVICE)  # none on a -inf logit
    for cfg in ({}, {"block_v": 128}, {"block_v": 64, "block_n": 2}):
        for temperature in (1.0, 0.7):
            # Rounding z ~ 1.4e4 to fp32 alone moves it by ~1e-3 (the reference rounds z in float64).
            _check_forward(logits, tokens, 1.0 / temperature, True, scale=1e3, **cfg)


def test_forward_degenerate_rows():
    """All -inf rows and out-of-range tokens follow the csrc convention (no NaN, no out-of-bounds read); NaN logits
    reach every output of their row only."""
    logits = torch.randn(4, 300, dtype=torch.float32, device=DEVICE)
    logits[0] = float("-inf")
    logits[2, 5] = float("nan")
    tokens = torch.tensor([3, -100, 7, 300], device=DEVICE)
    logp, lse, entropy = K.logits_forward(logits, tokens, 1.0, True, block_v=64)
    assert lse[0] == float("-inf") and logp[0] == float("-inf") and entropy[0] == 0
    assert logp[1] == float("-inf") and logp[3] == float("-inf")
    ref_lse = torch.logsumexp(logits[[1, 3]].double(), -1)
    torch.testing.assert_close(lse[[1, 3]].double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(entropy[[1, 3]]).all()
    assert lse[2].isnan() and logp[2].isnan() and entropy[2].isnan()

    g = torch.randn(4, device=DEVICE)
    ge = torch.randn(4, device=DEVICE)
    out = torch.full_like(logits, float("nan"))
    K.logits_backward(logits, tokens, 1.0, lse, g, entropy, ge, out=out, block_v=64)
    # An all -inf row: p = 0 everywhere, leaving the one-hot term.
    assert out[0, 3] == g[0] and (out[0, :3] == 0).all() and (out[0, 4:] == 0).all()
    # No token: only the softmax terms.
    for r in (1, 3):
        z = logits[r].double()
        p = torch.softmax(z, -1)
        ent = -(p * p.log()).sum()
        expected = -g[r] * p - ge[r] * p * (p.log() + ent)
        torch.testing.assert_close(out[r].double(), expected, rtol=1e-5, atol=1e-6)
    assert out[2].isnan().all()


def test_int64_offsets():
    """row * row_stride beyond 2^31 elements: a view over a 4 GiB buffer of which only a few pages are touched."""
    v, stride, n = 8, 1 << 20, 2050
    try:
        base = torch.empty(stride * (n - 1) + v, dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError:
        pytest.skip("cannot reserve a 4 GiB buffer")
    logits = base.as_strided((n, v), (stride, 1))
    g = torch.Generator().manual_seed(0)
    logits.copy_(torch.randn(n, v, generator=g).to(torch.bfloat16))  # copy_ moves it to DEVICE
    assert (n - 1) * stride > 2**31
    tokens = _tokens(n, v)
    logp, lse, entropy = _check_forward(logits, tokens, 1.0, True, block_n=1024)
    grad = K.logits_backward(logits, tokens, 1.0, lse, torch.ones(n, device=DEVICE), out=logits, block_n=1024)
    assert grad.data_ptr() == logits.data_ptr()
    assert torch.isfinite(logits[-3:]).all()


# ----------------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------------


def _check_backward(logits, tokens, inv_t, with_entropy, inplace, pad_out=0, tol=None, **cfg):
    n, v = logits.shape
    g = torch.Generator().manual_seed(2)
    grad_logp = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)
    grad_entropy = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE) if with_entropy else None
    ref_logp, ref_lse, ref_entropy = R.logits_forward(logits.double(), tokens, inv_t, True)
    expected = R.logits_backward(
        logits.double(), tokens, inv_t, ref_lse, grad_logp, ref_entropy if with_entropy else None, grad_entropy
    )
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    args = (ref_lse.to(acc), grad_logp.to(acc), ref_entropy.to(acc) if with_entropy else None)
    ge = grad_entropy.to(acc) if with_entropy else None
    rtol, atol = tol or _grad_tol(logits.dtype)
    if inplace:
        padding = logits.as_strided((n, logits.stride(0)), (logits.stride(0), 1))[:, v:].clone()
        out = K.logits_backward(logits, tokens, inv_t, args[0], args[1], args[2], ge, out=logits, **cfg)
        assert out.data_ptr() == logits.data_ptr()
        after = logits.as_strided((n, logits.stride(0)), (logits.stride(0), 1))[:, v:]
        assert torch.equal(after, padding), "the in-place backward wrote outside the view"
    else:
        poison = torch.full((n, v + pad_out), float("nan"), dtype=logits.dtype, device=DEVICE)
        out_view = poison[:, :v]
        out = K.logits_backward(logits, tokens, inv_t, args[0], args[1], args[2], ge, out=out_view, **cfg)
        assert out.data_ptr() == out_view.data_ptr()
        assert poison[:, v:].isnan().all(), "the backward wrote outside the out view"
        fresh = K.logits_backward(logits, tokens, inv_t, args[0], args[1], args[2], ge, **cfg)
        assert fresh.dtype == logits.dtype and fresh.shape == (n, v)
        _close(fresh, expected, rtol, atol, "dlogits (new tensor)")
    assert out.dtype == logits.dtype
    _close(out, expected, rtol, atol, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v,block_v,block_n", SHAPES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_backward_matches_reference(dtype, v, block_v, block_n, inplace):
    tokens = _tokens(5, v)
    for temperature, with_entropy in ((1.0, False), (0.7, True)):
        logits = _logits(5, v, dtype)
        _check_backward(logits, tokens, 1.0 / temperature, with_entropy, inplace, block_v=block_v, block_n=block_n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_backward_strided(dtype, inplace):
    logits = _logits(6, 1000, dtype, pad=24)
    tokens = _tokens(6, 1000, dtype=torch.int32)
    _check_backward(logits, tokens, 1.0 / 0.7, True, inplace, pad_out=40, block_v=256, block_n=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_extreme_logits(dtype):
    logits = _logits(4, 1000, torch.float64, scale=10.0)
    logits[0, :] = 1e4
    logits[1, ::2] = -1e4
    logits[2, :300] = float("-inf")
    logits[3, 1::3] = float("-inf")
    logits = logits.to(dtype)
    tokens = torch.tensor([17, 4, 900, 3], device=DEVICE)
    # fp32 rounds z ~ 1.4e4 to ~1e-3, so p = exp(z - lse) is good to ~1e-3 relative: loosen fp32 (only) here.
    tol = None if dtype != torch.float32 else (5e-3, 1e-5)
    for inplace in (False, True):
        _check_backward(logits.clone(), tokens, 1.0 / 0.7, True, inplace, tol=tol, block_v=128)
    _, lse, _ = K.logits_forward(logits, tokens, 1.0, False)
    out = K.logits_backward(logits, tokens, 1.0, lse, torch.ones(4, dtype=lse.dtype, device=DEVICE), block_v=128)
    assert (out[2, :300] == 0).all() and (out[3, 1::3] == 0).all()


def test_backward_expanded_grads_and_no_grad_logp():
    logits = _logits(5, 300, torch.float32)
    tokens = _tokens(5, 300)
    _, lse, entropy = K.logits_forward(logits, tokens, 1.0, True)
    g = torch.tensor([0.5], device=DEVICE).expand(5)  # the gradient of a sum: stride 0
    ge = torch.tensor([-2.0], device=DEVICE).expand(5)
    assert g.stride(0) == 0
    out = K.logits_backward(logits, tokens, 1.0, lse, g, entropy, ge, block_v=64, block_n=2)
    expected = R.logits_backward(logits.double(), tokens, 1.0, lse.double(), g.double(), entropy.double(), ge.double())
    _close(out, expected, 1e-5, 1e-6, "expanded grads")
    # grad_logp None: only the entropy term.
    out = K.logits_backward(logits, tokens, 1.0, lse, None, entropy, ge, block_v=64)
    zeros = torch.zeros(5, dtype=torch.float64, device=DEVICE)
    expected = R.logits_backward(logits.double(), tokens, 1.0, lse.double(), zeros, entropy.double(), ge.double())
    _close(out, expected, 1e-5, 1e-6, "no grad_logp")


# ----------------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    """(logp, entropy) of logits through the kernel pair, for gradcheck."""

    @staticmethod
    def forward(ctx, logits, tokens, inv_temperature, cfg):
        logp, lse, entropy = K.logits_forward(logits, tokens, inv_temperature, True, **cfg)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.inv_temperature, ctx.cfg = inv_temperature, cfg
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, tokens, lse, entropy = ctx.saved_tensors
        grad = K.logits_backward(
            logits, tokens, ctx.inv_temperature, lse, grad_logp, entropy, grad_entropy, **ctx.cfg
        )
        return grad, None, None, None


@pytest.mark.parametrize("cfg", [{}, {"block_v": 4, "block_n": 2}], ids=["default", "looped"])
def test_gradcheck(cfg):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 11, generator=g, dtype=torch.float64) * 2).to(DEVICE).requires_grad_()
    tokens = torch.tensor([0, 5, 10], device=DEVICE)
    inv_t = 1.0 / 0.7
    assert torch.autograd.gradcheck(lambda x: _TokenLogprobs.apply(x, tokens, inv_t, cfg), (logits,))
    # And against autograd through the public reference op.
    logp, entropy = _TokenLogprobs.apply(logits, tokens, inv_t, cfg)
    ref_logp, ref_entropy = R.token_logprobs(logits, tokens, 0.7, return_entropy=True)
    w = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    (grad,) = torch.autograd.grad((logp * w).sum() + entropy.sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_logp * w).sum() + ref_entropy.sum(), logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------------


def test_launch_config():
    # The video world model: small vocabulary, many rows -> several rows per program, few masked lanes.
    assert K._launch_config(2048 * 321, 4633) == (4, 1024, 4)
    # A Qwen-sized vocabulary: one row per program, the V loop.
    assert K._launch_config(8192, 151936) == (1, K.MAX_BLOCK_V, 8)
    assert K._launch_config(8192, 151936, fp64=True) == (1, K.MAX_BLOCK_V, 16)
    # Few rows: no packing that would starve the grid.
    assert K._launch_config(100, 1000)[0] == 1
    assert K._launch_config(5, 1) == (1, 1, 1)
    # Overrides win.
    assert K._launch_config(8192, 151936, block_v=256, block_n=2, num_warps=2) == (2, 256, 2)
    for n, v in [(1, 1), (3, 7), (10**6, 130), (10**5, 32000), (4096, 50257), (10**6, 151936)]:
        block_n, block_v, warps = K._launch_config(n, v)
        assert block_v <= K.MAX_BLOCK_V and (block_n == 1 or block_n * block_v <= K.MAX_PACKED_TILE)
        assert _pow2(block_n) and _pow2(block_v) and 1 <= warps <= 16
        assert _cover(v, block_v) <= max(K.MAX_PADDING * v, block_v)


def _cover(v, block_v):
    return -(-v // block_v) * block_v


def _pow2(x):
    return x > 0 and (x & (x - 1)) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Rows split into head, 16-byte body and tail; (B, T, V) rows read in place; rows without upstream gradient
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("v", [1, 3, 8, 9, 33, 4633])
def test_every_head_and_tail_length(dtype, v):
    """An odd row stride and a base one element past the allocation's start put the 9 rows' starts at every offset
    modulo 16 bytes, so the head and the tail take every length from 0 to 16 bytes - 1 (for v >= 16 bytes)."""
    n, stride = 9, v + (v + 1) % 2
    g = torch.Generator().manual_seed(v)
    buf = torch.full((n * stride + 8,), 777.0, dtype=torch.float64)
    buf[1:].as_strided((n, v), (stride, 1)).copy_(torch.randn(n, v, generator=g, dtype=torch.float64) * 3)
    logits = buf.to(dtype).to(DEVICE)[1:].as_strided((n, v), (stride, 1))
    tokens = _tokens(n, v)
    cfg = {"block_v": 8 if 16 < v < 100 else None, "block_n": 4}  # the V loop runs several steps
    _check_forward(logits, tokens, 1.0 / 0.7, True, **cfg)
    for inplace in (False, True):
        _check_backward(logits.clone() if not inplace else logits, tokens, 1.0 / 0.7, True, inplace, pad_out=2, **cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_sliced_three_dim_logits_in_place(dtype):
    """The [:, :-1] slice of (B, T + 1, V) logits: read where it is; the same values as its contiguous copy; the
    in-place backward writes the slice only (the dropped last position keeps its logits); a new gradient has rows at
    the logits' offsets modulo 16 bytes (vector stores as the loads)."""
    B, T, V = 2, 3, 4633
    g = torch.Generator().manual_seed(5)
    full = (torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    logits = full[:, :-1]
    assert not logits.is_contiguous() and logits.stride() == ((T + 1) * V, V, 1)
    dense = logits.contiguous()
    tokens = _tokens(B * T, V)
    for with_entropy in (False, True):
        got = K.logits_forward(logits, tokens, 1.0 / 0.7, with_entropy, block_v=1024)
        want = K.logits_forward(dense.view(B * T, V), tokens, 1.0 / 0.7, with_entropy, block_v=1024)
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-6 if dtype != torch.float64 else 1e-13, atol=1e-6)
    logp, lse, entropy = K.logits_forward(dense.view(B * T, V), tokens, 1.0, True)
    grad_logp = torch.randn(B * T, generator=g, dtype=lse.dtype).to(DEVICE)
    grad_entropy = torch.randn(B * T, generator=g, dtype=lse.dtype).to(DEVICE)
    args = (tokens, 1.0, lse, grad_logp, entropy, grad_entropy)
    expected = K.logits_backward(dense.view(B * T, V), *args).view(B, T, V)
    fresh = K.logits_backward(logits, *args)
    assert fresh.shape == (B, T, V) and K.aligned_like(logits, fresh)
    assert torch.equal(fresh, expected)
    last = full[:, -1].clone()
    out = K.logits_backward(logits, *args, out=logits)
    assert out.data_ptr() == full.data_ptr()
    assert torch.equal(full[:, :-1], expected) and torch.equal(full[:, -1], last)


def test_empty_rows_like_matches_the_row_offsets():
    for shape, strides in [((5, 7), (7, 1)), ((5, 7), (12, 1)), ((3, 4, 9), (45, 9, 1)), ((2, 3, 5), (100, 33, 1))]:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            logits = torch.empty(2000, dtype=dtype).as_strided(shape, strides)
            out = K.empty_rows_like(logits)
            vec = K.vector_elements(dtype)
            assert out.shape == logits.shape and out.dtype == dtype and K.aligned_like(logits, out)
            assert out.data_ptr() % 16 == 0
            assert out.untyped_storage().nbytes() <= (out.numel() + len(shape) * vec * shape[0]) * out.element_size()
            if logits.is_contiguous():
                assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_rows_without_upstream_gradient_get_zeros(dtype, with_entropy):
    """A masked position (grad_logp = grad_entropy = 0) gets exactly 0 whatever its row holds: NaN, +inf, all -inf;
    a NaN row that does get a gradient stays NaN. In place too."""
    n, v = 6, 300
    logits = _logits(n, v, torch.float64)
    logits[0, 5] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, :100] = float("nan")
    logits[5, 9] = float("nan")
    logits = logits.to(dtype)
    tokens = _tokens(n, v)
    logp, lse, entropy = K.logits_forward(logits, tokens, 1.0, True)
    grad_logp = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.7], dtype=lse.dtype, device=DEVICE)
    grad_entropy = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 0.0], dtype=lse.dtype, device=DEVICE)
    ge = grad_entropy if with_entropy else None
    for inplace in (False, True):
        buf = logits.clone()
        out = K.logits_backward(buf, tokens, 1.0, lse, grad_logp, entropy, ge, out=buf if inplace else None,
                                block_v=64, block_n=2)
        assert (out[:4] == 0).all(), "a row without upstream gradient got a nonzero gradient"
        assert torch.isfinite(out[4]).all() and out[5].isnan().all()
    # the reference primitive defines the same
    ref = R.logits_backward(logits.double(), tokens, 1.0, lse.double(), grad_logp.double(), entropy.double(),
                            ge.double() if with_entropy else None)
    assert (ref[:4] == 0).all() and torch.isfinite(ref[4]).all() and ref[5].isnan().all()
