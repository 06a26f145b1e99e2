"""The GRPO family's edges: bad arguments get an error naming them, empty inputs give empty or zero results, NaN at a
valid position propagates the same way on every backend (issue 17's cases, each of which failed before)."""

import math

import pytest
import torch

import rlvrw.ops as ops
from rlvrw import reference
from rlvrw.checks import ArgumentTypeError
from test_ops_grpo import loss_and_grad, make_batch, logits_batch

BACKENDS = ["reference", "triton"]


# ---- errors name the argument --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(old_logp=torch.zeros(4, 5)), ValueError, "old_logp must have shape"),
        (dict(mask=torch.ones(4, 36)), ValueError, "mask must have shape"),
        (dict(advantages=torch.zeros(3)), ValueError, "advantages must have shape"),
        (dict(rollout_is_weights=torch.ones(4, 3)), ValueError, "rollout_is_weights must have shape"),
        (dict(ref_logp=None, kl_coef=0.1), ValueError, "ref_logp is required"),
        (dict(kl_type="k4"), ValueError, "kl_type must be one of"),
        (dict(loss_agg="mean"), ValueError, "loss_agg must be one of"),
        (dict(ratio_level="seq"), ValueError, "ratio_level must be one of"),
        (dict(clip_low=1.5), ValueError, r"clip_low must be a finite number >= 0 and < 1, got 1.5"),
        (dict(clip_low="0.2"), ArgumentTypeError, "clip_low must be a real number, got str"),
        (dict(clip_high=math.nan), ValueError, "clip_high must be a finite number >= 0, got nan"),
        (dict(dual_clip=1.0), ValueError, "dual_clip must be a finite number > 1"),
        (dict(kl_coef=math.nan), ValueError, "kl_coef must be a finite number >= 0, got nan"),
        (dict(kl_coef=-0.1), ValueError, "kl_coef must be a finite number >= 0, got -0.1"),
        (dict(kl_coef="0.1"), ArgumentTypeError, "kl_coef must be a real number, got str"),
        (dict(kl_coef=True), ArgumentTypeError, "kl_coef must be a real number, got bool"),
        (dict(kl_clamp=0), ValueError, "kl_clamp must be a number \\(not NaN\\) > 0"),
        (dict(log_ratio_clamp=0), ValueError, "log_ratio_clamp must be a number \\(not NaN\\) > 0"),
        (dict(log_ratio_clamp=(1.0, 2.0)), ValueError, r"log_ratio_clamp\[0\] must be a number \(not NaN\) < 0"),
        (dict(log_ratio_clamp=(1.0,)), ValueError, "log_ratio_clamp must be a number c > 0 or a pair"),
        (dict(num_tokens="100"), ArgumentTypeError, "num_tokens must be a real number, got str"),
        (dict(num_tokens=0), ValueError, "num_tokens must be a finite number > 0"),
        (dict(num_seqs=torch.ones(3)), ValueError, "num_seqs must be a number or a one-element tensor"),
        (dict(norm_length=math.inf), ValueError, "norm_length must be a finite number > 0"),
        (dict(dp_size=0), ValueError, "dp_size must be a positive int"),
        (dict(dp_size=True), ArgumentTypeError, "dp_size must be an int, got bool"),
        (dict(dp_size=2), ValueError, "num_tokens \\(the global count\\) is required"),
        (dict(dp_size=2, loss_agg="seq-mean-token-mean"), ValueError, "num_seqs \\(the global count\\) is required"),
        (dict(count_empty_seqs=1), ArgumentTypeError, "count_empty_seqs must be True or False"),
        (dict(kl_cof=0.1), ValueError, "unknown option 'kl_cof'; did you mean 'kl_coef'"),
        (dict(logp=torch.zeros(4, 37, dtype=torch.int64)), ValueError, "logp must have dtype"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_grpo_loss_bad_input(change, error, match):
    args = {**make_batch(), **change}
    with pytest.raises(error, match=match):
        ops.grpo_loss(**args)


def test_argument_type_errors_are_value_errors_too():
    """Callers written against the earlier checks catch ValueError; a wrong type is a TypeError as well."""
    with pytest.raises(ValueError):
        ops.grpo_loss(**make_batch(), kl_coef="0.1")
    with pytest.raises(TypeError):
        ops.grpo_loss(**make_batch(), kl_coef="0.1")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(tokens=lambda t: t.float()), ValueError, "tokens must have dtype in"),
        (dict(temperature=0), ValueError, "temperature must be a finite number > 0, got 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be a finite number > 0, got inf"),
        (dict(temperature=True), ArgumentTypeError, "temperature must be a real number, got bool"),
        (dict(return_entropy="yes"), ArgumentTypeError, "return_entropy must be True or False"),
        (dict(inplace_backward=None), ArgumentTypeError, "inplace_backward must be True or False"),
        (dict(logits=lambda x: x[0]), ValueError, "logits must be 3-D"),
        (dict(logits=lambda x: x[..., :0]), ValueError, "logits must have a vocabulary \\(last\\) dimension of size"),
        (dict(clip_high="0.28"), ArgumentTypeError, "clip_high must be a real number"),
    ],
)
def test_grpo_loss_from_logits_bad_input(change, error, match):
    logits, tokens, batch = logits_batch()
    args = dict(logits=logits, tokens=tokens, old_logp=batch["old_logp"], advantages=batch["advantages"],
                mask=batch["mask"])
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(error, match=match):
        ops.grpo_loss_from_logits(**args)


def test_grpo_loss_from_logits_token_out_of_range():
    logits, tokens, batch = logits_batch()
    bad = torch.where(batch["mask"] != 0, tokens, 0)
    bad[0, 0] = 1000
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 1000\)"):
        ops.grpo_loss_from_logits(logits, bad, batch["old_logp"], batch["advantages"], batch["mask"])


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(10), 3), ValueError, "group_size .* must divide"),
        ((torch.randn(10), 0), ValueError, "group_size must be an int in \\[1, 4096\\]"),
        ((torch.randn(10), True), ArgumentTypeError, "group_size must be an int, got bool"),
        ((torch.randn(10), 5.0), ArgumentTypeError, "group_size must be an int, got float"),
        ((torch.randn(10), 5, -1e-6), ValueError, "eps must be a finite number >= 0"),
        ((torch.randn(10), 5, "1e-6"), ArgumentTypeError, "eps must be a real number"),
        ((torch.randn(10), 5, 1e-6, "global"), ValueError, "scale must be one of"),
        ((torch.randn(2, 5), 5), ValueError, "rewards must be 1-D"),
    ],
)
def test_group_advantages_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.group_advantages(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(level="seq"), "level must be one of"),
        (dict(threshold=0.0), "threshold must be a finite number > 0"),
        (dict(threshold=2.0, threshold_lower=3.0), "threshold_lower must be a finite number > 0 and <= 2"),
        (dict(rollout_logp=torch.zeros(4, 3)), "rollout_logp must have shape"),
    ],
)
def test_rollout_correction_weights_bad_input(kwargs, match):
    batch = make_batch()
    args = dict(old_logp=batch["old_logp"], rollout_logp=batch["ref_logp"], mask=batch["mask"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ops.rollout_correction_weights(**args)


# ---- empty inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", reference.grpo.LOSS_AGGS)
@pytest.mark.parametrize("shape", [(3, 0), (0, 5)])
def test_empty_batches_give_a_zero_loss(shape, agg, backend, kernel_device):
    """Issue 17: T=0 with seq-mean-token-sum-norm was NaN on Triton (0 on the reference)."""
    device = "cpu" if backend == "reference" else kernel_device
    batch = make_batch(B=max(shape[0], 1), T=max(shape[1], 1), device=device)
    batch = {k: v[: shape[0], : shape[1]] if v.dim() == 2 else v[: shape[0]] for k, v in batch.items()}
    loss, grad, stats = loss_and_grad(ops.grpo_loss, batch, kl_coef=0.1, loss_agg=agg, backend=backend)
    assert loss == 0 and grad.shape == shape and all(v == 0 for v in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_from_logits(backend, kernel_device):
    logits, tokens, batch = logits_batch(B=2, T=3, V=11, device="cpu" if backend == "reference" else kernel_device)
    cut = {k: v[:, :0] if v.dim() == 2 else v for k, v in batch.items()}
    loss, stats, entropy = ops.grpo_loss_from_logits(
        logits[:, :0], tokens[:, :0], cut["old_logp"], cut["advantages"], cut["mask"], cut["ref_logp"],
        return_entropy=True, kl_coef=0.1, backend=backend, loss_agg="seq-mean-token-sum-norm",
    )
    assert loss == 0 and entropy.shape == (2, 0)


# ---- NaN at a valid position propagates, identically -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["logp", "old_logp", "ref_logp", "advantages", "weights"])
@pytest.mark.parametrize("opts", [dict(kl_type="k3"), dict(kl_type="k1+", dual_clip=3.0),
                                  dict(ratio_level="sequence", loss_agg="seq-mean-token-mean")],
                         ids=["k3", "dual", "gspo"])
def test_nan_at_a_valid_position_propagates_identically(where, opts, kernel_device):
    """Issue 17: a NaN in an unmasked old or ref log-prob gave a NaN loss on the reference and a finite one on Triton."""
    batch = make_batch(spread=0.5)
    weights = torch.rand(batch["logp"].shape, dtype=torch.float64) + 0.5
    target = weights if where == "weights" else batch[where]
    if where == "advantages":
        target[0] = math.nan
    else:
        target[0, 0] = math.nan  # make_batch keeps every row's first token valid
    results = {}
    for backend in BACKENDS:
        device = "cpu" if backend == "reference" else kernel_device
        on_device = {k: v.to(device) for k, v in batch.items()}
        loss, grad, stats = loss_and_grad(ops.grpo_loss, on_device, kl_coef=0.1, rollout_is_weights=weights.to(device),
                                          backend=backend, **opts)
        loss, grad = loss.cpu(), grad.cpu()
        results[backend] = loss, grad
        assert torch.isnan(loss), backend
        assert torch.isfinite(grad[1:]).all(), backend  # the other rows are untouched
    (ref_loss, ref_grad), (loss, grad) = results["reference"], results["triton"]
    assert torch.equal(torch.isnan(grad), torch.isnan(ref_grad))
    torch.testing.assert_close(grad[1:], ref_grad[1:], rtol=1e-10, atol=1e-12)
