"""Plain-PyTorch reference of every op: the executable spec, used on CPU and by the tests."""

from rlvrw.reference.fsq import (
    fsq_codes_to_indices,
    fsq_dequantize,
    fsq_dequantize_table,
    fsq_indices_to_codes,
    fsq_quantize,
)
from rlvrw.reference.group_norm_silu import group_norm_silu
from rlvrw.reference.logprobs import linear_token_logprobs, token_logprobs
from rlvrw.reference.reward import (
    frame_weights,
    l1_lpips_reward,
    lpips_layer_distance,
    normalize_channels,
    rlvr_world_reward,
)
from rlvrw.reference.grpo import (
    aggregation_row_scale,
    grpo_loss,
    grpo_loss_from_logits,
    grpo_token_terms,
    group_advantages,
    kl_estimate,
    rollout_correction_weights,
)

__all__ = [
    "aggregation_row_scale",
    "frame_weights",
    "fsq_codes_to_indices",
    "fsq_dequantize",
    "fsq_dequantize_table",
    "fsq_indices_to_codes",
    "fsq_quantize",
    "group_norm_silu",
    "grpo_loss",
    "grpo_loss_from_logits",
    "grpo_token_terms",
    "group_advantages",
    "kl_estimate",
    "l1_lpips_reward",
    "linear_token_logprobs",
    "lpips_layer_distance",
    "normalize_channels",
    "rlvr_world_reward",
    "rollout_correction_weights",
    "token_logprobs",
]
