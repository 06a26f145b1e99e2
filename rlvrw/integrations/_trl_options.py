"""TRL's GRPO loss types as ``rlvrw.ops.grpo_loss`` options (TRL 1.16, and Liger 0.8.5 which restates them), and
TRL's importance-weighted KL term: the part shared by ``rlvrw.integrations.trl`` and ``rlvrw.integrations.liger``.
Needs only torch."""

from __future__ import annotations

import math

import torch

import rlvrw.ops as ops
from rlvrw import reference

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
UNSUPPORTED_LOSS_TYPES = ("cispo", "sapo", "vespo")  # not clipped-ratio losses


def trl_loss_options(loss_type: str, epsilon_low: float, epsilon_high: float, beta: float, delta: float | None,
                     importance_sampling_level: str, max_completion_length: int | None) -> dict:
    """``grpo_loss`` options of a TRL / Liger GRPO configuration, before the per-batch normalizers (see
    ``rlvrw.ops.grpo``'s table): TRL clamps neither the ratio nor the k3 estimate, and counts fully masked
    sequences in the sequence means."""
    if loss_type not in LOSS_TYPES:
        why = " (not a clipped-ratio loss)" if loss_type in UNSUPPORTED_LOSS_TYPES else ""
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}{why}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if delta is not None and not delta > 1 + epsilon_high:
        raise ValueError(f"delta must be > 1 + epsilon_high ({1 + epsilon_high}) or None, got {delta!r}")
    options = dict(clip_low=epsilon_low, clip_high=epsilon_high, dual_clip=delta, kl_coef=beta, kl_type="k3",
                   kl_clamp=math.inf, log_ratio_clamp=math.inf, ratio_level=importance_sampling_level,
                   count_empty_seqs=True)
    options["loss_agg"] = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                           "dapo": "token-mean", "luspo": "seq-mean-token-sum"}[loss_type]
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length is required for loss_type 'dr_grpo'")
        options["norm_length"] = max_completion_length
    ops.GRPOOptions(**options)  # bad values fail here, at construction
    return options


def ratio_weighted_kl(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, valid: torch.Tensor,
                      options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's KL term with ``use_bias_correction_kl`` (DeepSeek-V3.2): ``k3(ref, logp) * ratio`` per token, the ratio
    ``exp(logp - old_logp)`` (``"sequence"``: of the sequence's mean) unclamped and differentiable, so that the KL
    gradient is the unbiased reverse-KL gradient. Returns (its aggregate under ``options``, the way ``grpo_loss``
    aggregates its KL term; the per-token values, detached, 0 where masked). Elementwise over (B, T); masked
    positions do not reach either."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    log_ratio = logp - torch.where(valid, old_logp.to(logp.dtype), zero)
    if options["ratio_level"] == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    diff = torch.where(valid, ref_logp.to(logp.dtype), zero) - logp
    kl = torch.where(valid, (diff.exp() - diff - 1) * log_ratio.exp(), zero)
    row_scale = reference.aggregation_row_scale(
        valid, options["loss_agg"], options.get("num_tokens"), options.get("num_seqs"), options.get("norm_length"),
        kl.dtype, options.get("dp_size", 1), options["count_empty_seqs"],
    )
    return (kl * row_scale[:, None]).sum(), kl.detach()
