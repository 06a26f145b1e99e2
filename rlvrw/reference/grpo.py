"""Reference GRPO: group-relative advantages and the clipped-ratio policy loss with a KL penalty.

This is the executable spec of ``rlvrw.ops.group_advantages``, ``grpo_loss``, ``grpo_loss_from_logits`` and
``rollout_correction_weights``. With the same settings the values and gradients equal VERL 0.9.1's
(``compute_policy_loss_vanilla`` / ``_gspo``, ``kl_penalty``, ``agg_loss``, ``compute_rollout_correction_weights``),
TRL 1.16's ``GRPOTrainer._compute_loss``, Liger's ``LigerFusedLinearGRPOLoss`` and OpenRLHF's ``PolicyLoss``; the
tests compare against the installed packages. ``rlvrw.ops.grpo`` has the table of which peer setting is which
option. What differs, on inputs where a peer gives NaN or nothing useful:

* Masked positions (``mask == 0``) never reach the math: log-probs, old/reference log-probs, advantages and rollout
  weights there are replaced by 0 before any exp, so garbage (inf, NaN) at masked positions cannot leak into the
  loss or gradients. NaN at an unmasked position propagates (a NaN loss), as in the peers.
* A batch with no valid token gives loss 0 where VERL and OpenRLHF divide 0 by 0; a fully masked row has a
  sequence mean of 0 (VERL divides 0 by 1e-8), and the per-row token count of ``seq-mean-token-mean`` is
  ``max(len, 1)`` where VERL and OpenRLHF use ``len + 1e-8`` (a relative difference of 1e-8 / len).
* A group of size 1 gets advantage 0 (VERL gives it its raw reward); a group whose rewards are all equal gets
  exactly 0, also with ``eps=0`` (where the formula is 0 / 0).

Where the peers disagree with each other the choice is an option, named after what it does: fully masked rows
count in the default sequence count with ``count_empty_seqs=True`` (TRL's ``grpo``, ``dr_grpo``) and not without
(VERL, OpenRLHF); ``kl_clamp`` and ``log_ratio_clamp`` are VERL's clamps (``inf`` for TRL, which has none).
"""

from __future__ import annotations

import math

import torch

from rlvrw.reference.logprobs import compute_dtype, token_logprobs

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_TYPES = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")
LOSS_AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")
ROLLOUT_IS_LEVELS = ("token", "sequence")
K3_VALUE_CLAMP = 10.0  # VERL clamps the k3 estimate to [-10, 10]: the default of kl_clamp
ROLLOUT_IS_LOG_CLAMP = 20.0  # VERL's SAFETY_BOUND on the log of a rollout importance weight


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: str = "group"
) -> torch.Tensor:
    """GRPO advantages for rewards laid out group by group, (B*G,) -> (B*G,).

    ``A_i = (r_i - mean_g(r)) / (s + eps)`` with ``s`` the unbiased std of the group (``"group"``, as VERL and the
    GRPO paper), the unbiased std of all rewards in the batch (``"batch"``, as TRL's ``scale_rewards="batch"``), or no
    division at all (``"none"``, Dr. GRPO). A group of one, and a group whose rewards are all equal, gets exactly 0
    (the mean of equal floats can round away from them; ``eps=0`` would make that 0 / 0). Where ``s + eps`` is 0
    the advantage is 0 with a zero gradient.
    """
    r = rewards.to(compute_dtype(rewards.dtype)).reshape(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    tied = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centered = centered - torch.where(tied, centered.detach(), 0)  # exactly 0, the gradient kept
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        sq_sum, count = centered.square().sum(dim=1, keepdim=True), group_size
    else:
        sq_sum, count = (r - r.mean()).square().sum(), r.numel()
    var = sq_sum / max(count - 1, 1)
    # torch.std's gradient is NaN at zero spread (a group whose samples all scored the same, common in RL); the
    # double where keeps it finite by treating the std as a constant there.
    std = torch.where(var > 0, torch.where(var > 0, var, 1).sqrt(), 0)
    denom = std + eps
    return torch.where(denom > 0, centered / torch.where(denom > 0, denom, 1), 0).reshape(-1)


def k3_exponent_bounds(kl_clamp: float) -> tuple[float, float]:
    """Bounds for the exponent x = -d of k3 = exp(x) - x - 1 outside which k3 > kl_clamp, so clamping x to them
    changes neither the clamped value nor its (zero) gradient, and keeps exp finite. No bounds for an infinite
    kl_clamp. (k3 > c for x < -(c + 1), and for x > log(2 (c + 1)) since y > log(2 y) for y >= 1.)"""
    if math.isinf(kl_clamp):
        return -math.inf, math.inf
    return -(kl_clamp + 1.0), math.log(2.0 * (kl_clamp + 1.0))


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str, kl_clamp: float = K3_VALUE_CLAMP):
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1, k2, k3).

    ``d = logp - ref_logp``; k1 = d, abs = |d|, k2 = d^2 / 2, k3 = exp(-d) + d - 1 clamped to [-kl_clamp, kl_clamp]
    (VERL: 10; TRL: none, ``kl_clamp=inf``). A ``+`` suffix takes the value of the estimate and the gradient of k2
    (straight-through), the unbiased gradient of the KL.
    """
    d = logp - ref_logp
    base = kl_type.rstrip("+")
    if base == "k1":
        value = d
    elif base == "abs":
        value = d.abs()
    elif base == "k2":
        value = 0.5 * d.square()
    else:
        lo, hi = k3_exponent_bounds(kl_clamp)
        x = (-d).clamp(lo, hi)
        value = (x.exp() - x - 1).clamp(-kl_clamp, kl_clamp)
    if kl_type.endswith("+"):
        k2 = 0.5 * d.square()
        return value.detach() + (k2 - k2.detach())
    return value


def log_ratio_bounds(log_ratio_clamp) -> tuple[float, float]:
    """(low, high) of the policy log-ratio clamp: ``c`` means [-c, c]; a pair is taken as is."""
    if isinstance(log_ratio_clamp, (tuple, list)):
        return float(log_ratio_clamp[0]), float(log_ratio_clamp[1])
    return -float(log_ratio_clamp), float(log_ratio_clamp)


def sequence_count(valid: torch.Tensor, count_empty_seqs: bool, dtype: torch.dtype) -> torch.Tensor:
    """The default number of sequences of a seq-mean mode: rows with a valid token (at least 1), or all rows."""
    if count_empty_seqs:
        return torch.full((), valid.shape[0], dtype=dtype, device=valid.device)
    return valid.any(dim=1).sum().to(dtype).clamp(min=1)


def aggregation_row_scale(
    valid: torch.Tensor,
    loss_agg: str,
    num_tokens=None,
    num_seqs=None,
    norm_length=None,
    dtype: torch.dtype = torch.float32,
    dp_size: int = 1,
    count_empty_seqs: bool = False,
) -> torch.Tensor:
    """Per-row weight c_b such that the aggregated loss is ``sum_{b,t} valid[b,t] * c_b * loss[b,t]`` (VERL's
    ``agg_loss``; VERL's names in brackets).

    token-mean: dp_size / N, N = num_tokens [batch_num_tokens], default the valid tokens here (at least 1).
    token-sum: dp_size. seq-mean-token-sum: dp_size / S, S = num_seqs [global_batch_size], default the rows with a
    valid token (at least 1), or all B rows with ``count_empty_seqs``. seq-mean-token-mean: dp_size / (S * max(len_b,
    1)). seq-mean-token-sum-norm: dp_size / (S * L), L = norm_length [loss_scale_factor], default T (at least 1).
    Pass the global N or S to make micro-batches add up to the big batch, and the number of data-parallel ranks as
    dp_size when their gradients are averaged. Explicit counts are used as given.
    """
    B, T = valid.shape
    ones = torch.full((B,), float(dp_size), dtype=dtype, device=valid.device)
    if loss_agg == "token-sum":
        return ones
    if loss_agg == "token-mean":
        if num_tokens is None:
            return ones / valid.sum().to(dtype).clamp(min=1)
        return ones / torch.as_tensor(num_tokens, device=valid.device).to(dtype)
    if num_seqs is None:
        seqs = sequence_count(valid, count_empty_seqs, dtype)
    else:
        seqs = torch.as_tensor(num_seqs, device=valid.device).to(dtype)
    if loss_agg == "seq-mean-token-sum":
        return ones / seqs
    if loss_agg == "seq-mean-token-sum-norm":
        return ones / (seqs * (max(T, 1) if norm_length is None else norm_length))
    return ones / (seqs * valid.sum(dim=1).to(dtype).clamp(min=1))


def grpo_token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    ref_logp: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_type: str,
    log_ratio_clamp,
    ratio_level: str,
    kl_clamp: float = K3_VALUE_CLAMP,
    rollout_is_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token policy loss, KL estimate and clip indicators, all (B, T), finite at every masked position.

    ``ratio = exp(clamp(logp - old_logp, lo, hi))`` per token (``log_ratio_bounds``: VERL [-20, 20], TRL none), or
    for ``ratio_level="sequence"`` (GSPO) the value ``exp(clamp(mean_t(logp - old_logp), lo, hi))`` of the sequence
    with the gradient of the token's own log-prob (VERL clamps it to at most 10, OpenRLHF and TRL do not).
    ``pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``; with ``dual_clip = c3`` a negative
    advantage's loss is capped at ``-A * c3`` (Ye et al. 2020; VERL's ``clip_ratio_c``). ``rollout_is_weights``
    ((B, T), or (B, 1) per sequence) multiply ``pg`` as constants (VERL's rollout correction, TRL's vLLM importance
    sampling); the KL term is not weighted.
    """
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(valid, logp, zero)
    old = torch.where(valid, old_logp.to(logp.dtype), zero)
    adv = torch.where(valid, advantages.to(logp.dtype).expand_as(logp), zero)
    log_ratio = lp - old
    if ratio_level == "sequence":
        seq_log_ratio = log_ratio.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        log_ratio_value = lp - lp.detach() + seq_log_ratio.detach()
    else:
        log_ratio_value = log_ratio
    lo, hi = log_ratio_bounds(log_ratio_clamp)
    ratio = log_ratio_value.clamp(lo, hi).exp()
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(loss_unclipped, loss_clipped)
    clipped = valid & (loss_clipped > loss_unclipped)
    clipped_lower = torch.zeros_like(valid)
    if dual_clip is not None:
        loss_cap = -adv * dual_clip
        clipped_lower = valid & (adv < 0) & (pg > loss_cap)
        pg = torch.where(adv < 0, torch.minimum(pg, loss_cap), pg)
    if rollout_is_weights is not None:
        pg = pg * torch.where(valid, rollout_is_weights.detach().to(logp.dtype).expand_as(logp), zero)
    terms = {
        "pg": pg,
        "clipped": clipped,
        "clipped_lower": clipped_lower,
        "neg_log_ratio": -log_ratio.detach().clamp(lo, hi),  # 0 where masked
    }
    if ref_logp is not None:
        ref = torch.where(valid, ref_logp.to(logp.dtype), zero)
        terms["kl"] = kl_estimate(lp, ref, kl_type, kl_clamp)
    return terms


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    loss_agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    norm_length=None,
    log_ratio_clamp=20.0,
    ratio_level: str = "token",
    dp_size: int = 1,
    count_empty_seqs: bool = False,
    kl_clamp: float = K3_VALUE_CLAMP,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss = agg(pg) + kl_coef * agg(kl)`` over (B, T) token log-probs; see ``grpo_token_terms`` for the terms
    and ``aggregation_row_scale`` for ``agg``. Advantages and rollout_is_weights are (B,) or (B, T). Returns the loss
    and a dict of 0-d tensors: pg_loss, kl, clip_frac, clip_frac_lower, approx_kl (the last three are means over
    valid tokens)."""
    valid = mask != 0
    logp = logp.to(compute_dtype(logp.dtype))
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if rollout_is_weights is not None and rollout_is_weights.dim() == 1:
        rollout_is_weights = rollout_is_weights.unsqueeze(1)
    terms = grpo_token_terms(
        logp, old_logp, advantages, valid, ref_logp, clip_low, clip_high, dual_clip, kl_type, log_ratio_clamp,
        ratio_level, kl_clamp, rollout_is_weights,
    )
    row_scale = aggregation_row_scale(
        valid, loss_agg, num_tokens, num_seqs, norm_length, logp.dtype, dp_size, count_empty_seqs
    )
    weight = torch.where(valid, row_scale[:, None], 0)
    pg_loss = (weight * terms["pg"]).sum()
    kl = (weight * terms["kl"]).sum() if "kl" in terms else torch.zeros((), dtype=logp.dtype, device=logp.device)
    loss = pg_loss + kl_coef * kl if kl_coef != 0 else pg_loss
    n_valid = valid.sum().clamp(min=1).to(logp.dtype)
    stats = {
        "pg_loss": pg_loss.detach(),
        "kl": kl.detach(),
        "clip_frac": terms["clipped"].sum() / n_valid,
        "clip_frac_lower": terms["clipped_lower"].sum() / n_valid,
        "approx_kl": terms["neg_log_ratio"].sum() / n_valid,
    }
    return loss, stats


def grpo_loss_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    rollout_is_weights: torch.Tensor | None = None,
    **options,
):
    """``grpo_loss(token_logprobs(logits, tokens, temperature), ...)`` with logits (B, T, V). With
    ``return_entropy`` also the (B, T) entropy of ``softmax(logits / temperature)``, 0 at masked positions."""
    valid = mask != 0
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    if return_entropy:
        logp, entropy = token_logprobs(logits, tokens, temperature, True)
    else:
        logp = token_logprobs(logits, tokens, temperature)
    loss, stats = grpo_loss(logp, old_logp, advantages, mask, ref_logp, rollout_is_weights=rollout_is_weights, **options)
    if return_entropy:
        return loss, stats, torch.where(valid, entropy, 0)
    return loss, stats


def rollout_correction_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    threshold: float = 2.0,
    threshold_lower: float | None = None,
) -> torch.Tensor:
    """Truncated importance weights pi_old / pi_rollout for ``grpo_loss(rollout_is_weights=...)`` (VERL's
    ``compute_rollout_correction_weights``), (B, T), detached, 0 where masked.

    ``level="token"``: ``w_t = exp(clamp(old_t - rollout_t, -20, 20))``; ``"sequence"``: one weight per row,
    ``exp(clamp(sum_t (old_t - rollout_t), -20, 20))``. Then truncated to at most ``threshold`` (TIS), or, with
    ``threshold_lower``, set to 0 outside [threshold_lower, threshold] (IcePop).
    """
    valid = mask != 0
    dtype = compute_dtype(old_logp.dtype)
    zero = torch.zeros((), dtype=dtype, device=old_logp.device)
    log_ratio = torch.where(valid, old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype), zero)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    weights = torch.where(valid, log_ratio.clamp(-ROLLOUT_IS_LOG_CLAMP, ROLLOUT_IS_LOG_CLAMP).exp(), zero)
    if threshold_lower is None:
        return weights.clamp(max=threshold)
    keep = (weights >= threshold_lower) & (weights <= threshold)
    return torch.where(keep, weights, zero)

