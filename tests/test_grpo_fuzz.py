"""Property-based fuzz of the GRPO family (hypothesis): random shapes, masks, options and garbage (NaN, inf, 1e30, bad
token ids) at masked positions. Whatever the masked positions hold, the loss, its gradient and the stats are finite,
the gradient is 0 at masked positions, and the reference and Triton backends agree in float64 (Triton interpreted on
CPU tensors without a GPU, compiled on CUDA tensors with one; the reference runs on the CPU).

A bounded number of derandomized examples, so that CI runs the same cases in well under a minute.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rlvrw.ops as ops  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
GARBAGE = [math.nan, math.inf, -math.inf, 1e30, -1e30]
TOL = dict(rtol=1e-9, atol=1e-11)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_of(backend: str) -> str:
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def on(device: str, tensors: dict) -> dict:
    return {k: v.to(device) if v is not None else None for k, v in tensors.items()}

OPTIONS = st.fixed_dictionaries({
    "loss_agg": st.sampled_from(["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"]),
    "kl_type": st.sampled_from(["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"]),
    "kl_coef": st.sampled_from([0.0, 0.1]),
    "dual_clip": st.sampled_from([None, 3.0]),
    "ratio_level": st.sampled_from(["token", "sequence"]),
    "count_empty_seqs": st.booleans(),
    "clip_high": st.sampled_from([0.2, 0.28]),
    "log_ratio_clamp": st.sampled_from([20.0, 1.0, (-math.inf, 10.0)]),
    "kl_clamp": st.sampled_from([10.0, 0.5]),
})


@st.composite
def batches(draw, max_b=5, max_t=9):
    """(tensors, masked garbage fill) with a random mask: rows may be fully masked, the whole batch may be."""
    B, T = draw(st.integers(1, max_b)), draw(st.integers(0, max_t))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    spread = draw(st.sampled_from([0.05, 1.0, 40.0]))  # 40: log ratios far past every clamp
    mask = torch.rand(B, T, generator=g) < density
    logp = -torch.rand(B, T, dtype=torch.float64, generator=g) * 5
    batch = {
        "logp": logp,
        "old_logp": logp + spread * torch.randn(B, T, dtype=torch.float64, generator=g),
        "ref_logp": logp + spread * torch.randn(B, T, dtype=torch.float64, generator=g),
        "advantages": torch.randn((B, T) if draw(st.booleans()) else (B,), dtype=torch.float64, generator=g),
        "weights": torch.rand(B, T, dtype=torch.float64, generator=g) * 2 if draw(st.booleans()) else None,
        "mask": mask,
    }
    fill = torch.tensor(GARBAGE, dtype=torch.float64)[torch.randint(0, len(GARBAGE), (B, T), generator=g)]
    return batch, fill


def poisoned(batch, fill):
    mask, out = batch["mask"], dict(batch)
    for key in ("logp", "old_logp", "ref_logp", "weights"):
        if out[key] is not None:
            out[key] = torch.where(mask, out[key], fill)
    if out["advantages"].dim() == 2:
        out["advantages"] = torch.where(mask, out["advantages"], fill)
    return out


def run(batch, backend, options):
    """Loss, gradient and stats on ``backend``, on the CPU."""
    batch = on(device_of(backend), batch)
    logp = batch["logp"].clone().requires_grad_(True)
    loss, stats = ops.grpo_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], batch["ref_logp"],
                                rollout_is_weights=batch["weights"], backend=backend, **options)
    loss.backward()
    return loss.detach().cpu(), logp.grad.cpu(), on("cpu", stats)


@FUZZ
@given(data=batches(), options=OPTIONS)
def test_grpo_loss_fuzz(data, options):
    batch, fill = data
    bad = poisoned(batch, fill)
    results = [run(bad, backend, options) for backend in ("reference", "triton")]
    for loss, grad, stats in results:
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert (grad[~batch["mask"]] == 0).all()
        assert all(torch.isfinite(v) for v in stats.values())
    (ref_loss, ref_grad, ref_stats), (loss, grad, stats) = results
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key].to(stats[key].dtype), **TOL)
    clean_loss, clean_grad, _ = run(batch, "reference", options)  # garbage changed nothing
    torch.testing.assert_close(ref_loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(ref_grad, clean_grad, rtol=0, atol=0)


@FUZZ
@given(data=batches(max_b=3, max_t=5), vocab=st.integers(1, 40), temperature=st.sampled_from([1.0, 0.6, 3.0]),
       options=OPTIONS, bad_token=st.sampled_from([-100, -1, 10**6]))
def test_grpo_loss_from_logits_fuzz(data, vocab, temperature, options, bad_token):
    batch, fill = data
    bad = poisoned(batch, fill)
    B, T = batch["mask"].shape
    g = torch.Generator().manual_seed(B * 100 + T * 10 + vocab)
    logits = torch.randn(B, T, vocab, dtype=torch.float64, generator=g) * 3
    tokens = torch.where(batch["mask"], torch.randint(0, vocab, (B, T), generator=g), bad_token)
    results = []
    for backend in ("reference", "triton"):
        device = device_of(backend)
        x = logits.to(device, copy=True).requires_grad_(True)
        b = on(device, bad)
        loss, stats, entropy = ops.grpo_loss_from_logits(
            x, tokens.to(device), b["old_logp"], b["advantages"], b["mask"], b["ref_logp"], temperature,
            return_entropy=True, rollout_is_weights=b["weights"], inplace_backward=False, backend=backend, **options,
        )
        (loss + 0.01 * entropy.sum()).backward()
        loss, grad, entropy = loss.detach().cpu(), x.grad.cpu(), entropy.detach().cpu()
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(entropy).all()
        assert (entropy[~batch["mask"]] == 0).all() and (grad[~batch["mask"]] == 0).all()
        results.append((loss, grad, entropy))
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, **TOL)


@FUZZ
@given(groups=st.integers(1, 6), group_size=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
       ties=st.sampled_from([0.0, 0.5, 1.0]), eps=st.sampled_from([0.0, 1e-6]),
       scale=st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_fuzz(groups, group_size, seed, ties, eps, scale):
    """Rewards with tied groups (all equal, or repeated values): finite, and equal on both backends."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (groups * group_size,), generator=g).double() / 3  # 1/3: ties that round
    tied = torch.rand(groups, generator=g) < ties
    rewards = torch.where(tied.repeat_interleave(group_size), rewards.view(groups, group_size)[:, :1].expand(
        groups, group_size).reshape(-1), rewards)
    weights = torch.randn(groups * group_size, dtype=torch.float64, generator=g)
    results = []
    for backend in ("reference", "triton"):
        device = device_of(backend)
        r = rewards.to(device, copy=True).requires_grad_(True)
        adv = ops.group_advantages(r, group_size, eps=eps, scale=scale, backend=backend)
        (adv * weights.to(device)).sum().backward()
        adv, grad = adv.detach().cpu(), r.grad.cpu()
        assert torch.isfinite(adv).all() and torch.isfinite(grad).all()
        assert (adv.view(groups, group_size)[tied] == 0).all()
        results.append((adv, grad))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-9)
