"""rlvrw.ops GRPO family: every backend against the reference in float64 (the reference against the peers' own code is
tests/test_grpo_peers.py; bad inputs and edge cases are tests/test_ops_grpo_inputs.py)."""

import itertools
import math

import pytest
import torch

import rlvrw.ops as ops
from rlvrw import reference
from rlvrw.reference import peers

AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KL_TYPES = ["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"]


def make_batch(B=4, T=37, dtype=torch.float64, device="cpu", spread=0.3, fully_masked_row=True):
    logp = -torch.rand(B, T, dtype=torch.float64) * 3
    batch = {
        "logp": logp,
        "old_logp": logp + spread * torch.randn(B, T, dtype=torch.float64),
        "ref_logp": logp + spread * torch.randn(B, T, dtype=torch.float64),
        "advantages": torch.randn(B, dtype=torch.float64),
        "mask": (torch.rand(B, T) > 0.25).to(torch.float64),
    }
    batch["mask"][:, 0] = 1
    if fully_masked_row:
        batch["mask"][-1] = 0
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def poison_masked(batch):
    """Garbage where the mask is 0, as real padded batches have."""
    out = dict(batch)
    masked = batch["mask"] == 0
    garbage = torch.tensor([math.inf, -math.inf, math.nan], dtype=batch["logp"].dtype, device=masked.device)
    fill = garbage[torch.arange(masked.numel(), device=masked.device) % 3].view(masked.shape)
    for key in ("logp", "old_logp", "ref_logp"):
        out[key] = torch.where(masked, fill, batch[key])
    return out


def loss_and_grad(fn, batch, **opts):
    logp = batch["logp"].clone().requires_grad_(True)
    loss, stats = fn(logp, batch["old_logp"], batch["advantages"], batch["mask"], batch["ref_logp"], **opts)
    loss.backward()
    return loss.detach(), logp.grad, stats


# ---- backends against the reference --------------------------------------------------------------------------------

OPTION_GRID = [
    dict(kl_coef=0.1, kl_type=kl, loss_agg=agg, dual_clip=dual, ratio_level=level)
    for kl, agg, dual, level in itertools.chain(
        itertools.product(KL_TYPES, ["token-mean"], [3.0], ["token"]),
        itertools.product(["k3"], AGGS, [None, 3.0], ["token", "sequence"]),
    )
] + [
    dict(kl_coef=0.1, loss_agg="seq-mean-token-mean", count_empty_seqs=True),
    dict(kl_coef=0.1, loss_agg="seq-mean-token-sum-norm", count_empty_seqs=True, norm_length=50),
    dict(kl_coef=0.1, loss_agg="token-mean", num_tokens=200, dp_size=3),
    dict(kl_coef=0.1, loss_agg="seq-mean-token-sum", num_seqs=9, dp_size=2),
    dict(kl_coef=0.3, kl_clamp=math.inf, log_ratio_clamp=math.inf),  # TRL: no clamps
    dict(kl_coef=0.3, kl_clamp=2.0, log_ratio_clamp=0.5),
    dict(kl_coef=0.1, ratio_level="sequence", log_ratio_clamp=(-math.inf, 0.3)),  # VERL's GSPO clamp, hit
]


@pytest.mark.parametrize("opts", OPTION_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_triton_grpo_loss_matches_reference(opts, kernel_device):
    batch = make_batch(device=kernel_device, spread=1.0)
    ref_loss, ref_grad, ref_stats = loss_and_grad(reference.grpo_loss, batch, clip_high=0.28, **opts)
    loss, grad, stats = loss_and_grad(
        ops.grpo_loss, poison_masked(batch), clip_high=0.28, backend="triton", **opts
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key].to(stats[key].dtype), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grpo_loss_extreme_log_ratios_and_garbage_stay_finite(backend, kernel_device):
    device = "cpu" if backend == "reference" else kernel_device
    batch = make_batch(device=device, spread=60.0)  # |log ratio| far past the clamp
    loss, grad, stats = loss_and_grad(
        ops.grpo_loss, poison_masked(batch), kl_coef=0.1, dual_clip=3.0, backend=backend
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    assert (grad[batch["mask"] == 0] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fully_masked_batch_gives_zero_loss(backend, kernel_device):
    device = "cpu" if backend == "reference" else kernel_device
    batch = poison_masked({**make_batch(device=device), "mask": torch.zeros(4, 37, dtype=torch.float64, device=device)})
    for agg in AGGS:
        loss, grad, stats = loss_and_grad(ops.grpo_loss, batch, kl_coef=0.1, loss_agg=agg, backend=backend)
        assert loss == 0 and (grad == 0).all() and all(v == 0 for v in stats.values())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs(backend, dtype, tol, kernel_device):
    device = "cpu" if backend == "reference" else kernel_device
    batch = {k: v.to(dtype) for k, v in make_batch(device=device).items()}
    loss, grad, _ = loss_and_grad(ops.grpo_loss, batch, kl_coef=0.1, dual_clip=3.0, backend=backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # the same (rounded) inputs in float64: the only difference left is the output rounding
    ref_loss, ref_grad, _ = loss_and_grad(
        reference.grpo_loss, {k: v.double() for k, v in batch.items()}, kl_coef=0.1, dual_clip=3.0
    )
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_global_normalizer_equal_one_big_batch(backend, agg, kernel_device):
    device = "cpu" if backend == "reference" else kernel_device
    batch = make_batch(B=6, device=device)
    big_loss, big_grad, _ = loss_and_grad(ops.grpo_loss, batch, kl_coef=0.1, loss_agg=agg, backend=backend)
    valid = batch["mask"] != 0
    # device tensors: no host sync needed to pass them; the fully masked row is no sequence (as in VERL)
    total, sequences = valid.sum(), valid.any(dim=1).sum()
    loss_sum, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):
        part = {k: v[rows] for k, v in batch.items()}
        loss, grad, _ = loss_and_grad(
            ops.grpo_loss, part, kl_coef=0.1, loss_agg=agg, backend=backend, num_tokens=total, num_seqs=sequences
        )
        loss_sum, grads = loss_sum + loss, grads + [grad]
    torch.testing.assert_close(loss_sum, big_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat(grads), big_grad, rtol=1e-12, atol=1e-14)


def test_per_token_advantages(kernel_device):
    batch = make_batch(device=kernel_device)
    batch["advantages"] = torch.randn(batch["logp"].shape, dtype=torch.float64, device=kernel_device)
    ref_loss, ref_grad, _ = loss_and_grad(reference.grpo_loss, batch, kl_coef=0.1)
    loss, grad, _ = loss_and_grad(ops.grpo_loss, batch, kl_coef=0.1, backend="triton")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


# ---- the fused loss from logits ------------------------------------------------------------------------------------


def logits_batch(B=3, T=5, V=1000, dtype=torch.float64, device="cpu"):
    batch = make_batch(B, T, dtype=torch.float64, device=device)
    logits = (torch.randn(B, T, V, dtype=torch.float64, device=device) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), device=device)
    tokens[batch["mask"] == 0] = -100  # padding ids are fine where masked
    return logits, tokens, batch


def from_logits_loss_and_grad(logits, tokens, batch, **opts):
    logits = logits.clone().requires_grad_(True)
    loss, stats = ops.grpo_loss_from_logits(
        logits, tokens, batch["old_logp"], batch["advantages"], batch["mask"], batch["ref_logp"], **opts
    )
    loss.backward()
    return loss.detach(), logits.grad, stats


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("vocab", [1000, 4633])
def test_grpo_loss_from_logits_matches_reference(temperature, vocab, kernel_device):
    logits, tokens, batch = logits_batch(V=vocab, device=kernel_device)
    opts = dict(temperature=temperature, kl_coef=0.01, dual_clip=3.0, clip_high=0.28)
    ref_loss, ref_grad, ref_stats = from_logits_loss_and_grad(logits, tokens, batch, backend="reference", **opts)
    for inplace in (False, True):
        loss, grad, stats = from_logits_loss_and_grad(
            logits, tokens, poison_masked(batch), backend="triton", inplace_backward=inplace, **opts
        )
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        for key in ref_stats:
            torch.testing.assert_close(stats[key], ref_stats[key].to(stats[key].dtype), rtol=1e-10, atol=1e-12)


def test_grpo_loss_from_logits_bfloat16(kernel_device):
    logits, tokens, batch = logits_batch(V=4633, dtype=torch.bfloat16, device=kernel_device)
    batch = {k: v.float() for k, v in batch.items()}
    ref_loss, ref_grad, _ = from_logits_loss_and_grad(logits.double(), tokens, batch, backend="reference", kl_coef=0.01)
    loss, grad, _ = from_logits_loss_and_grad(logits, tokens, batch, backend="triton", kl_coef=0.01)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=1e-4)


def test_grpo_loss_from_logits_gradcheck(kernel_device):
    logits, tokens, batch = logits_batch(B=2, T=3, V=13, device=kernel_device)

    def fn(x):
        return ops.grpo_loss_from_logits(
            x, tokens, batch["old_logp"][:2, :3], batch["advantages"][:2], batch["mask"][:2, :3],
            batch["ref_logp"][:2, :3], temperature=0.8, kl_coef=0.1, backend="triton", inplace_backward=False,
        )[0]

    assert torch.autograd.gradcheck(fn, (logits.requires_grad_(True),))


# ---- group advantages ----------------------------------------------------------------------------------------------


def verl_style_advantages(rewards, group_size, eps=1e-6):
    scores = rewards.clone()
    for g in range(rewards.numel() // group_size):
        group = rewards[g * group_size:(g + 1) * group_size]
        scores[g * group_size:(g + 1) * group_size] = (group - group.mean()) / (group.std() + eps)
    return scores


@pytest.mark.parametrize("group_size", [1, 3, 16, 17])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_triton_matches_reference(group_size, scale, kernel_device):
    rewards = torch.randn(5 * group_size, dtype=torch.float64, device=kernel_device)
    rewards[:group_size] = 0.5  # a group whose samples all scored the same
    ref = reference.group_advantages(rewards, group_size, scale=scale)
    r = rewards.clone().requires_grad_(True)
    out = ops.group_advantages(r, group_size, scale=scale, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    r_ref = rewards.clone().requires_grad_(True)
    (reference.group_advantages(r_ref, group_size, scale=scale) * weights).sum().backward()
    torch.testing.assert_close(r.grad, r_ref.grad, rtol=1e-8, atol=1e-10)
    if group_size == 1:
        assert (out == 0).all()
    assert (out[:group_size] == 0).all()


def test_group_advantages_match_verl():
    rewards = torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close(ops.group_advantages(rewards, 16), verl_style_advantages(rewards, 16))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_group_advantages_of_tied_groups_are_zero_even_without_eps(backend, scale):
    """Issue 17: eps=0 on a group whose rewards are all equal was 0/0 = NaN. 0.1 * 3 / 3 != 0.1 in floating point,
    so the mean of a tied group can round away from its rewards: the group must still get exactly 0."""
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 2.5, 0.7, 0.7, 0.7], dtype=torch.float64)
    r = rewards.clone().requires_grad_(True)
    adv = ops.group_advantages(r, 3, eps=0.0, scale=scale, backend=backend)
    assert torch.isfinite(adv).all() and (adv[:3] == 0).all() and (adv[6:] == 0).all() and (adv[3:6] != 0).all()
    (adv * torch.arange(9.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(r.grad).all()
    ref = rewards.clone().requires_grad_(True)
    (reference.group_advantages(ref, 3, 0.0, scale) * torch.arange(9.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(r.grad, ref.grad, rtol=1e-10, atol=1e-12)
    everything_tied = ops.group_advantages(torch.full((6,), 0.3, dtype=torch.float64), 3, eps=0.0, scale=scale,
                                           backend=backend)
    assert (everything_tied == 0).all()


# ---- module, rollout weights, entropy, the bench baselines -------------------------------------------------------


def test_grpo_loss_module_matches_function():
    batch = make_batch()
    module = ops.GRPOLoss(kl_coef=0.1, dual_clip=3.0)
    loss, _ = module(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"], ref_logp=batch["ref_logp"])
    expected, _ = ops.grpo_loss(**batch, kl_coef=0.1, dual_clip=3.0)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per_sequence_weights", [False, True])
def test_rollout_is_weights_triton_matches_reference(level, per_sequence_weights, kernel_device):
    batch = make_batch(device=kernel_device, spread=1.0)
    B, T = batch["logp"].shape
    shape = (B,) if per_sequence_weights else (B, T)
    weights = torch.rand(shape, dtype=torch.float64, device=kernel_device) * 2
    opts = dict(kl_coef=0.1, dual_clip=3.0, ratio_level=level, loss_agg="seq-mean-token-mean")
    ref_loss, ref_grad, ref_stats = loss_and_grad(reference.grpo_loss, batch, rollout_is_weights=weights, **opts)
    unweighted, _, _ = loss_and_grad(reference.grpo_loss, batch, **opts)
    poisoned_weights = weights if per_sequence_weights else torch.where(batch["mask"] != 0, weights, math.nan)
    loss, grad, stats = loss_and_grad(ops.grpo_loss, poison_masked(batch), rollout_is_weights=poisoned_weights,
                                      backend="triton", **opts)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["pg_loss"], ref_stats["pg_loss"], rtol=1e-10, atol=1e-12)
    assert not torch.isclose(ref_loss, unweighted)  # the weights did something
    # the weights multiply the policy term only
    pg_only, _, _ = loss_and_grad(reference.grpo_loss, batch, rollout_is_weights=2 * weights, **opts)
    torch.testing.assert_close(pg_only - ref_loss, ref_stats["pg_loss"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_entropy_from_the_fused_loss(backend, kernel_device):
    """return_entropy: the entropy of softmax(logits / T) from the same pass, 0 where masked, differentiable."""
    device = "cpu" if backend == "reference" else kernel_device
    logits, tokens, batch = logits_batch(V=333, device=device)
    args = (tokens, batch["old_logp"], batch["advantages"], batch["mask"], batch["ref_logp"], 0.7)
    x = logits.clone().requires_grad_(True)
    loss, stats, entropy = ops.grpo_loss_from_logits(x, *args, return_entropy=True, inplace_backward=False,
                                                     backend=backend, kl_coef=0.05)
    valid = batch["mask"] != 0
    _, expected_entropy = reference.token_logprobs(logits, torch.where(valid, tokens, 0), 0.7, True)
    torch.testing.assert_close(entropy, torch.where(valid, expected_entropy, 0), rtol=1e-12, atol=1e-12)
    plain, _ = ops.grpo_loss_from_logits(logits.clone(), *args, backend=backend, kl_coef=0.05)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    bonus = (entropy * torch.linspace(0.5, 1.5, entropy.numel(), dtype=entropy.dtype).view(entropy.shape)).sum()
    (loss - 0.1 * bonus).backward()
    y = logits.clone().requires_grad_(True)
    ref_loss, _, ref_entropy = reference.grpo_loss_from_logits(y, *args, return_entropy=True, kl_coef=0.05)
    ref_bonus = (ref_entropy * torch.linspace(0.5, 1.5, entropy.numel(), dtype=entropy.dtype).view(entropy.shape))
    (ref_loss - 0.1 * ref_bonus.sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


def test_bench_eager_baselines_compute_our_loss():
    """bench/ times ``peers.verl_grpo_step_loss`` and ``peers.trl_grpo_step_loss`` as the eager way: the same loss."""
    logits, tokens, batch = logits_batch(B=4, T=6, V=50)
    batch["mask"][-1, 0] = 1  # no fully masked row: the eager baselines divide 0 by 0 there
    tokens = torch.where(batch["mask"] != 0, tokens.clamp(min=0), 0)
    adv = batch["advantages"]
    for agg in ("token-mean", "seq-mean-token-mean"):
        eager = peers.verl_grpo_step_loss(logits, tokens, batch["old_logp"], batch["ref_logp"], adv[:, None],
                                          batch["mask"], clip_high=0.28, kl_coef=0.05, loss_agg_mode=agg,
                                          temperature=0.9)
        ours, _ = ops.grpo_loss_from_logits(logits, tokens, batch["old_logp"], adv, batch["mask"], batch["ref_logp"],
                                            0.9, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, loss_agg=agg)
        torch.testing.assert_close(eager.double(), ours, rtol=1e-6, atol=1e-7)  # the eager path is float32
    eager = peers.trl_grpo_step_loss(logits, tokens, batch["old_logp"], batch["ref_logp"], adv, batch["mask"],
                                     beta=0.05)
    ours, _ = ops.grpo_loss_from_logits(logits, tokens, batch["old_logp"], adv, batch["mask"], batch["ref_logp"],
                                        kl_coef=0.05, kl_clamp=math.inf, log_ratio_clamp=math.inf)
    torch.testing.assert_close(eager.double(), ours, rtol=1e-6, atol=1e-7)
