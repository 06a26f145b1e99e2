"""rlvrw.ops.token_logprobs and linear_token_logprobs: every backend against the float64 reference, gradients too."""

import math
import types

import pytest
import torch

import rlvrw.ops as ops
import rlvrw.ops.grpo
import rlvrw.ops.logprobs
from rlvrw import reference
from rlvrw.ops import _primitives


def backends(kernel_device):
    return [("reference", "cpu"), ("triton", kernel_device)]


def grads_of(fn, *inputs, weights):
    """Values and gradients of sum(weights * outputs) for a function returning (logp, entropy)."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    logp, entropy = fn(*leaves)
    ((logp * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
    return logp.detach(), entropy.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("vocab", [7, 1000, 4633])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_token_logprobs_matches_reference(vocab, temperature, backend, kernel_device):
    device = "cpu" if backend == "reference" else kernel_device
    logits = torch.randn(2, 3, vocab, dtype=torch.float64, device=device) * 3
    tokens = torch.randint(0, vocab, (2, 3), device=device)
    weights = torch.randn(2, 2, 3, dtype=torch.float64, device=device)
    expect = grads_of(lambda x: reference.token_logprobs(x, tokens, temperature, True), logits, weights=weights)
    for inplace in (False, True):
        got = grads_of(
            lambda x: ops.token_logprobs(
                x * 1.0, tokens, temperature, True, inplace_backward=inplace, backend=backend
            ),
            logits, weights=weights,
        )
        for g, e in zip(got[:2] + tuple(got[2]), expect[:2] + tuple(expect[2])):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
def test_token_logprobs_low_precision(dtype, tol, kernel_device):
    logits = (torch.randn(4, 4633, device=kernel_device) * 4).to(dtype)
    tokens = torch.randint(0, 4633, (4,), device=kernel_device)
    logp, entropy = ops.token_logprobs(logits, tokens, 0.9, True, backend="triton")
    assert logp.dtype == torch.float32
    ref_logp, ref_entropy = reference.token_logprobs(logits.double(), tokens, 0.9, True)
    # fp32 math on the same rounded inputs: only accumulation order differs
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    g = torch.randn(4, device=kernel_device)
    x = logits.clone().requires_grad_(True)
    (ops.token_logprobs(x, tokens, 0.9, backend="triton") * g).sum().backward()
    xr = logits.double().requires_grad_(True)
    (reference.token_logprobs(xr, tokens, 0.9) * g.double()).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol * 1e-2)


def test_token_logprobs_extreme_logits_stay_finite(kernel_device):
    logits = torch.randn(3, 300, dtype=torch.float64, device=kernel_device)
    logits[0, :10] = 1e4
    logits[1, 5:] = -float("inf")  # a vocabulary mask
    logits[2] = -1e4
    tokens = torch.tensor([3, 2, 7], device=kernel_device)
    for backend in ("reference", "triton"):
        x = (logits if backend == "triton" else logits.cpu()).clone().requires_grad_(True)
        logp, entropy = ops.token_logprobs(x, tokens.to(x.device), 0.5, True, backend=backend)
        (logp.sum() + entropy.sum()).backward()
        assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(x.grad).all()
        ref_logp, ref_entropy = reference.token_logprobs(logits.cpu(), tokens.cpu(), 0.5, True)
        torch.testing.assert_close(logp.cpu(), ref_logp, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(entropy.cpu(), ref_entropy, rtol=1e-10, atol=1e-10)


def test_token_logprobs_gradcheck(kernel_device):
    logits = torch.randn(3, 11, dtype=torch.float64, device=kernel_device, requires_grad=True)
    tokens = torch.randint(0, 11, (3,), device=kernel_device)
    assert torch.autograd.gradcheck(
        lambda x: ops.token_logprobs(x, tokens, 0.8, True, backend="triton"), (logits,)
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_linear_token_logprobs_matches_reference(backend, chunk_rows, kernel_device):
    device = "cpu" if backend == "reference" else kernel_device
    N, H, V = 10, 16, 1000  # 10 rows in chunks of 4: a partial last chunk
    hidden = torch.randn(N, H, dtype=torch.float64, device=device)
    weight = torch.randn(V, H, dtype=torch.float64, device=device) / 4
    tokens = torch.randint(0, V, (N,), device=device)
    weights = torch.randn(2, N, dtype=torch.float64, device=device)
    expect = grads_of(
        lambda h, w: reference.linear_token_logprobs(h, w, tokens, 0.7, True), hidden, weight, weights=weights
    )
    got = grads_of(
        lambda h, w: ops.linear_token_logprobs(h, w, tokens, 0.7, True, chunk_rows=chunk_rows, backend=backend),
        hidden, weight, weights=weights,
    )
    for g, e in zip(got[:2] + tuple(got[2]), expect[:2] + tuple(expect[2])):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_linear_token_logprobs_bfloat16_three_dims(kernel_device):
    hidden = torch.randn(2, 5, 32, device=kernel_device).bfloat16()
    weight = (torch.randn(333, 32, device=kernel_device) / 6).bfloat16()
    tokens = torch.randint(0, 333, (2, 5), device=kernel_device)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = ops.linear_token_logprobs(h, w, tokens, chunk_rows=3, backend="triton")
    logp.sum().backward()
    assert logp.shape == (2, 5) and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference.token_logprobs((hr @ wr.t()).bfloat16().double(), tokens)  # the model's bf16 logits
    ref.sum().backward()
    torch.testing.assert_close(logp.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=3e-2, atol=3e-2)


def test_logprob_ops_bad_input():
    logits, tokens = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    cases = [
        (lambda: ops.token_logprobs(logits, tokens[:, :2]), "tokens must have shape"),
        (lambda: ops.token_logprobs(logits, tokens.float()), "tokens must have dtype in"),
        (lambda: ops.token_logprobs(logits, tokens - 1), r"tokens must lie in \[0, 10\)"),
        (lambda: ops.token_logprobs(logits, tokens, temperature=-1.0), "temperature must be a finite number > 0"),
        (lambda: ops.token_logprobs(logits, tokens, temperature=math.inf), "temperature must be a finite number > 0"),
        (lambda: ops.token_logprobs(logits, tokens, temperature=True), "temperature must be a real number, got bool"),
        (lambda: ops.token_logprobs(logits, tokens, temperature="1"), "temperature must be a real number, got str"),
        (lambda: ops.token_logprobs(logits, tokens, return_entropy=1), "return_entropy must be True or False"),
        (lambda: ops.token_logprobs(logits[..., :0], tokens), r"logits must have a vocabulary \(last\) dimension"),
        (lambda: ops.token_logprobs(logits[0, 0], tokens[0, 0]), "logits must be 2-D or 3-D"),
        (lambda: ops.linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 7), torch.randint(0, 10, (4,))),
         "weight must have shape"),
        (lambda: ops.linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8).double(), torch.randint(0, 10, (4,))),
         "weight must have the dtype of hidden"),
        (lambda: ops.linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,)), chunk_rows=0),
         "chunk_rows must be a positive int"),
        (lambda: ops.linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,)), chunk_rows=True),
         "chunk_rows must be an int, got bool"),
        (lambda: ops.linear_token_logprobs(torch.randn(4, 8), torch.randn(0, 8), torch.randint(0, 1, (4,))),
         "weight must have at least one row"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_value_checks_can_be_turned_off():
    logits, tokens = torch.randn(2, 10), torch.tensor([1, 10])
    ops.set_value_checks(False)
    try:
        ops.token_logprobs(logits, tokens.clamp(max=9))  # shape/dtype checks still run; values are not read
    finally:
        ops.set_value_checks(True)
    with pytest.raises(ValueError, match="tokens must lie"):
        ops.token_logprobs(logits, tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Strided logits, no rows, masked rows
# ----------------------------------------------------------------------------------------------------------------------


def _cuda_ready() -> bool:
    from rlvrw import _C_loader

    return torch.cuda.is_available() and _C_loader.load()


CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _cuda_ready(), reason="needs CUDA and the built rlvrw._C extension")])
KERNEL_BACKENDS = ["triton", CUDA]


def _spy_on_logits_passes(monkeypatch) -> list:
    """Every logits tensor the backends' logits passes receive, in call order."""
    seen, real = [], _primitives.logits_passes

    def spying(backend):
        passes = real(backend)

        def wrap(fn):
            def call(logits, *args, **kwargs):
                seen.append(logits)
                return fn(logits, *args, **kwargs)

            return call

        return types.SimpleNamespace(logits_forward=wrap(passes.logits_forward),
                                     logits_backward=wrap(passes.logits_backward))

    for module in (rlvrw.ops.logprobs, rlvrw.ops.grpo):
        monkeypatch.setattr(module, "logits_passes", spying)
    return seen


def _device(backend, kernel_device):
    return "cuda" if backend == "cuda" else kernel_device


def _float_dtype(backend):
    return torch.float32 if backend == "cuda" else torch.float64  # the CUDA kernels take fp32/bf16/fp16


def _tolerance(backend):
    return dict(rtol=1e-4, atol=1e-5) if backend == "cuda" else dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_reads_a_sliced_logits_tensor_in_place(backend, entropy, kernel_device, monkeypatch):
    """token_logprobs(logits[:, :-1]) of a model's (B, T + 1, V) output: the logits passes get the slice itself (the
    storage and strides of the model's tensor: no copy), and the values and gradients are the reference's."""
    device = _device(backend, kernel_device)
    B, T, V = 2, 3, 4633
    dtype = _float_dtype(backend)
    full = (torch.randn(B, T + 1, V, dtype=torch.float64) * 3).to(device, dtype)
    tokens = torch.randint(0, V, (B, T)).to(device)
    weights = torch.randn(2, B, T, dtype=torch.float64).to(device, dtype)
    seen = _spy_on_logits_passes(monkeypatch)
    for inplace in (False, True):
        seen.clear()
        x = full.clone().requires_grad_(True)
        sliced = x * 1.0  # not a leaf: the in-place backward may overwrite it
        out = ops.token_logprobs(sliced[:, :-1], tokens, 0.7, entropy, inplace_backward=inplace, backend=backend)
        logp, ent = out if entropy else (out, torch.zeros_like(out))
        ((logp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
        assert len(seen) == 2 and all(t.data_ptr() == sliced.data_ptr() for t in seen)
        assert all(t.stride() == ((T + 1) * V, V, 1) for t in seen)
        r = full.double().clone().requires_grad_(True)
        ref = reference.token_logprobs(r[:, :-1], tokens, 0.7, entropy)
        ref_logp, ref_ent = ref if entropy else (ref, torch.zeros_like(ref))
        ((ref_logp * weights[0].double()).sum() + (ref_ent * weights[1].double()).sum()).backward()
        torch.testing.assert_close(logp.double(), ref_logp.detach(), **_tolerance(backend))
        torch.testing.assert_close(x.grad.double(), r.grad, **_tolerance(backend))
        assert (x.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grpo_loss_from_logits_reads_a_sliced_logits_tensor_in_place(backend, kernel_device, monkeypatch):
    device = _device(backend, kernel_device)
    B, T, V = 3, 4, 1000
    full = (torch.randn(B, T + 1, V, dtype=torch.float64) * 2).to(device, _float_dtype(backend))
    tokens = torch.randint(0, V, (B, T)).to(device)
    old = torch.randn(B, T, dtype=torch.float64).to(device) * 0.1 - 7
    ref_logp = old + 0.05
    advantages = torch.randn(B, dtype=torch.float64).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[1, 2:] = False
    seen = _spy_on_logits_passes(monkeypatch)
    x = full.clone().requires_grad_(True)
    sliced = x * 1.0
    loss, _ = ops.grpo_loss_from_logits(sliced[:, :-1], tokens, old, advantages, mask, ref_logp, 0.9,
                                        backend=backend, kl_coef=0.1, dual_clip=3.0)
    loss.backward()
    assert len(seen) == 2 and all(t.data_ptr() == sliced.data_ptr() for t in seen)
    assert all(t.stride() == ((T + 1) * V, V, 1) for t in seen)
    r = full.double().clone().requires_grad_(True)
    ref_loss, _ = reference.grpo_loss_from_logits(r[:, :-1], tokens, old, advantages, mask, ref_logp, 0.9,
                                                  kl_coef=0.1, dual_clip=3.0)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, **_tolerance(backend))
    torch.testing.assert_close(x.grad.double(), r.grad, **_tolerance(backend))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_no_rows_give_empty_outputs_and_zero_gradients(backend, shape, kernel_device):
    device = "cpu" if backend == "reference" else kernel_device
    V, H = 37, shape[-1]
    hidden = torch.randn(shape, device=device, requires_grad=True)
    weight = torch.randn(V, H, device=device, requires_grad=True)
    tokens = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    for chunk_rows in (None, 4):
        hidden.grad = weight.grad = None
        logp, entropy = ops.linear_token_logprobs(hidden, weight, tokens, 0.7, True, chunk_rows=chunk_rows,
                                                  backend=backend)
        assert logp.shape == entropy.shape == shape[:-1]
        (logp.sum() + entropy.sum()).backward()
        assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
        assert (weight.grad == 0).all()
    logits = torch.randn(*shape[:-1], V, device=device, requires_grad=True)
    logp, entropy = ops.token_logprobs(logits, tokens, 0.7, True, backend=backend)
    assert logp.shape == entropy.shape == shape[:-1]
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


def _garbage_rows(logits: torch.Tensor) -> torch.Tensor:
    """The rows 0, 1, 2 of (N, V) logits set to NaN-holding, +inf-holding and all -inf."""
    logits = logits.clone()
    logits[0, 5] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    return logits


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA])
@pytest.mark.parametrize("entropy", [False, True])
def test_rows_without_gradient_never_give_nonfinite_gradients(backend, entropy, kernel_device):
    """A position whose log-prob (and entropy) gets no gradient gets a zero d(logits) row whatever it holds (NaN,
    inf, all -inf), on every backend; the other rows are unchanged."""
    device = "cpu" if backend == "reference" else _device(backend, kernel_device)
    n, V = 6, 300
    dtype = _float_dtype(backend)
    logits = _garbage_rows(torch.randn(n, V, dtype=torch.float64) * 2).to(device, dtype)
    tokens = torch.randint(0, V, (n,)).to(device)
    weights = torch.randn(2, n, dtype=torch.float64).to(device, dtype)
    weights[:, :3] = 0
    x = logits.clone().requires_grad_(True)
    out = ops.token_logprobs(x, tokens, 0.8, entropy, backend=backend)
    logp, ent = out if entropy else (out, torch.zeros_like(out))
    ((logp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    assert (x.grad[:3] == 0).all() and torch.isfinite(x.grad).all()
    # all -inf: the same values on every backend (lse = logp = -inf, entropy 0)
    assert logp[2] == float("-inf") and (not entropy or ent[2] == 0)
    clean = logits[3:].cpu().double().requires_grad_(True)
    ref = reference.token_logprobs(clean, tokens[3:].cpu(), 0.8, entropy)
    ref_logp, ref_ent = ref if entropy else (ref, torch.zeros_like(ref))
    ((ref_logp * weights[0, 3:].cpu()).sum() + (ref_ent * weights[1, 3:].cpu()).sum()).backward()
    torch.testing.assert_close(x.grad[3:].cpu().double(), clean.grad, **_tolerance(backend))


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA])
def test_grpo_masked_logits_rows_never_give_nonfinite_gradients(backend, kernel_device):
    """NaN, inf or all -inf anywhere in a masked row: a finite loss and a zero gradient for that row, the same on
    every backend."""
    device = "cpu" if backend == "reference" else _device(backend, kernel_device)
    B, T, V = 2, 4, 300
    clean = torch.randn(B * T, V, dtype=torch.float64) * 2
    logits = clean.clone()
    logits[[1, 4, 7]] = _garbage_rows(clean[[1, 4, 7]])
    logits = logits.view(B, T, V).to(device, _float_dtype(backend))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask.view(-1)[[1, 4, 7]] = False
    mask = mask.to(device)
    tokens = torch.randint(0, V, (B, T)).to(device).masked_fill(~mask, -100)
    old = (torch.randn(B, T, dtype=torch.float64) * 0.1 - 6).to(device)
    advantages = torch.randn(B, dtype=torch.float64).to(device)
    losses, grads = {}, {}
    for name, dev in ((backend, device), ("reference", "cpu")):
        x = logits.to(dev).clone().requires_grad_(True)
        loss, _ = ops.grpo_loss_from_logits(x, tokens.to(dev), old.to(dev), advantages.to(dev), mask.to(dev),
                                            old.to(dev) + 0.01, kl_coef=0.1, backend=name)
        loss.backward()
        losses[name], grads[name] = loss.detach().cpu(), x.grad.cpu()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert (x.grad.view(B * T, V)[[1, 4, 7]] == 0).all()
    torch.testing.assert_close(losses[backend], losses["reference"], **_tolerance(backend))
    torch.testing.assert_close(grads[backend], grads["reference"], **_tolerance(backend))


def test_reference_token_logprobs_gradcheck():
    """The reference's backward (autograd's gradient of log_softmax, gather and -sum p log p, written out) against
    numerical derivatives, a -inf logit included."""
    logits = torch.randn(3, 11, dtype=torch.float64) * 2
    logits[1, 4] = float("-inf")
    logits.requires_grad_(True)
    tokens = torch.tensor([0, 5, 10])
    assert torch.autograd.gradcheck(lambda x: reference.token_logprobs(x, tokens, 0.8, True), (logits,))
    assert torch.autograd.gradcheck(lambda x: reference.token_logprobs(x, tokens, 0.8), (logits,))


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_linear_token_logprobs_under_autocast_is_the_bf16_linear(chunk_rows):
    """Under bf16 autocast an fp32 head behaves as an nn.Linear would: the matmuls in bf16, gradients back in fp32,
    forward and backward on the same logits (one chunk kept, or several recomputed)."""
    torch.manual_seed(3)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    tokens = torch.randint(0, 37, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy = ops.linear_token_logprobs(hidden, weight, tokens, temperature=0.7, chunk_rows=chunk_rows,
                                                  return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = (h.bfloat16() @ w.bfloat16().t()).double()
    ref_logp, ref_entropy = reference.token_logprobs(logits, tokens, 0.7, True)
    (ref_logp.sum() + ref_entropy.sum()).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad, w.grad, rtol=2e-2, atol=2e-2)
