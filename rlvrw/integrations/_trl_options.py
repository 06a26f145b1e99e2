"""TRL's GRPO loss types as ``rlvrw.ops.grpo_loss`` options (TRL 1.16, and Liger 0.8.5 which restates them): the
part shared by ``rlvrw.integrations.trl`` and ``rlvrw.integrations.liger``. Needs only torch."""

from __future__ import annotations

import math

import rlvrw.ops as ops

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
