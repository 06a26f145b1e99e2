"""rlvrw.integrations.openrlhf.PolicyLoss against OpenRLHF 0.11's ``PolicyLoss``, in float64.

OpenRLHF does not install on CPU (see tests/test_grpo_peers.py), so the peer is its ``PolicyLoss.forward`` as its
source (openrlhf/models/loss.py) reads: the loss from ``openrlhf_policy_loss`` there, and below the parts it leaves
out (the vLLM importance-sampling coefficients, GSPO's ratio against the rollout policy, the returned metrics).
Where openrlhf imports, the same cases run against the real class. Our side gets garbage at masked positions.
"""

import pytest
import torch
from test_grpo_peers import make_batch, openrlhf_policy_loss, poisoned

from rlvrw.integrations.openrlhf import PolicyLoss

TOL = dict(rtol=1e-7, atol=1e-10)
THRESHOLD = (0.7, 1.4)


def openrlhf_is_coefficient(old, rollout, mask, correction_type, low, high):
    """OpenRLHF's vLLM importance-sampling coefficient of the "ppo" loss, as its source computes it."""
    log_ratio = old - rollout
    ratio = log_ratio.exp()
    if correction_type == "icepop":
        return ratio * ((ratio >= low) & (ratio <= high))
    if correction_type == "seq-mask-tis":
        seq_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1)).exp()
        return ((seq_ratio >= low) & (seq_ratio <= high)).unsqueeze(-1) * ratio
    return ratio.clamp(min=low, max=high)


def openrlhf_reference(batch, rollout, lp, loss_type, token_level, dual_clip, correction, counts):
    """OpenRLHF's (loss, clip_ratio, ppo_kl, vllm_kl) for log-probs ``lp``."""
    mask, adv, old = batch["mask"].double(), batch["advantages"][:, None], batch["old_logp"]
    coef, vllm_kl, base = None, None, old
    if correction is not None and loss_type == "ppo":
        coef = openrlhf_is_coefficient(old, rollout, mask, correction, *THRESHOLD)
        vllm_kl = ((rollout - old) * mask).sum() / mask.sum()
    if correction is not None and loss_type == "gspo":
        base = rollout
    loss = openrlhf_policy_loss(lp, base, adv, mask, 0.2, 0.28, dual_clip, token_level, loss_type, coef, **counts)
    with torch.no_grad():
        if loss_type == "gspo":
            ratio = (((lp - base) * mask).sum(-1) / mask.sum(-1).clamp(min=1)).exp().unsqueeze(-1) * mask
        else:
            ratio = (lp - base).clamp(-20, 20).exp()
        clipped = (ratio.clamp(0.8, 1.28) * adv < ratio * adv).double()
        clip_ratio = (clipped * mask).sum() / mask.sum()
        ppo_kl = ((old - lp) * mask).sum() / mask.sum()
    return loss, clip_ratio, ppo_kl, vllm_kl


CASES = [  # (policy_loss_type, token_level_loss, dual_clip, vLLM IS correction type, global counts)
    ("ppo", True, None, None, False), ("ppo", True, 3.0, "tis", True), ("ppo", False, None, "icepop", False),
    ("ppo", False, 3.0, "seq-mask-tis", True), ("gspo", True, None, None, False), ("gspo", False, None, "tis", True),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_policy_loss_equals_openrlhf(case, backend, kernel_device, monkeypatch):
    monkeypatch.setenv("RLVRW_BACKEND", backend)
    device = "cpu" if backend == "reference" else kernel_device
    loss_type, token_level, dual_clip, correction, global_counts = case
    batch = make_batch(spread=0.8 if loss_type == "ppo" else 0.2)
    mask = batch["mask"]
    rollout = batch["old_logp"] + 0.3 * torch.randn_like(batch["old_logp"])
    counts = dict(dp_size=2, batch_num_tokens=70.0, global_batch_size=11.0) if global_counts else {}
    lp = batch["logp"].clone().requires_grad_(True)
    expected = openrlhf_reference(batch, rollout, lp, loss_type, token_level, dual_clip, correction, counts)
    expected[0].backward()

    module = PolicyLoss(0.2, 0.28, dual_clip, token_level, loss_type, enable_vllm_is_correction=correction is not None,
                        vllm_is_truncated_threshold=list(THRESHOLD), vllm_is_correction_type=correction or "tis")
    on = (lambda t: poisoned(t, mask).to(device))
    ours_lp = on(batch["logp"]).requires_grad_(True)
    got = module(ours_lp, on(batch["old_logp"]), on(batch["advantages"][:, None] * mask), mask.double().to(device),
                 rollout_log_probs=on(rollout), **counts)
    got[0].backward()
    torch.testing.assert_close(got[0].detach().cpu(), expected[0].detach(), **TOL)
    torch.testing.assert_close(ours_lp.grad.cpu(), lp.grad, **TOL)
    for name, a, b in zip(("clip_ratio", "ppo_kl"), got[1:3], expected[1:3]):
        torch.testing.assert_close(a.cpu(), b, **TOL, msg=name)
    if expected[3] is None:
        assert got[3] is None
    else:
        torch.testing.assert_close(got[3].cpu(), expected[3], **TOL)
    assert torch.isfinite(ours_lp.grad).all() and (ours_lp.grad[~mask.to(device)] == 0).all()
    if correction is not None and loss_type == "ppo":  # the correction changed the loss
        plain = PolicyLoss(0.2, 0.28, dual_clip, token_level, loss_type)(
            on(batch["logp"]), on(batch["old_logp"]), on(batch["advantages"][:, None] * mask), mask.to(device),
            **counts)[0]
        assert not torch.isclose(plain.cpu(), got[0].detach().cpu())


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_policy_loss_equals_the_installed_package(case):
    loss_module = pytest.importorskip("openrlhf.models.loss", reason="OpenRLHF does not install on CPU")
    loss_type, token_level, dual_clip, correction, global_counts = case
    batch = make_batch(spread=0.5)
    mask = batch["mask"].double()
    rollout = batch["old_logp"] + 0.3 * torch.randn_like(batch["old_logp"])
    counts = dict(dp_size=2, batch_num_tokens=70.0, global_batch_size=11.0) if global_counts else {}
    args = (0.2, 0.28, dual_clip, token_level, loss_type, correction is not None, list(THRESHOLD), correction or "tis")
    call = (batch["logp"], batch["old_logp"], batch["advantages"][:, None] * mask, mask)
    theirs = loss_module.PolicyLoss(*args)(*call, rollout_log_probs=rollout, **counts)
    ours = PolicyLoss(*args)(*call, rollout_log_probs=rollout, **counts)
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b.to(a.dtype), **TOL)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="cispo")
    with pytest.raises(ValueError, match="vllm_is_correction_type"):
        PolicyLoss(vllm_is_correction_type="clip")
    with pytest.raises(ValueError, match="vllm_is_truncated_threshold"):
        PolicyLoss(enable_vllm_is_correction=True)
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(dual_clip=0.5)
    batch = make_batch(B=2, T=3)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        PolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.5, 2.0])(
            batch["logp"], batch["old_logp"], batch["advantages"][:, None], batch["mask"])
