"""rlvrw's public ops: autograd-aware, input-checked, dispatched per call to the reference, Triton or CUDA backend.

See ``rlvrw.ops._backend`` for how a backend is chosen and ``report()`` for what is installed.
"""

import importlib

from rlvrw.ops._backend import format_report, report
from rlvrw.checks import set_value_checks
from rlvrw.ops.fsq import fsq_codes_to_indices, fsq_dequantize, fsq_indices_to_codes, fsq_quantize
from rlvrw.ops.group_norm_silu import group_norm_silu
from rlvrw.ops.grpo import (
    GRPOLoss,
    GRPOOptions,
    group_advantages,
    grpo_loss,
    grpo_loss_from_logits,
    rollout_correction_weights,
)
from rlvrw.ops.logprobs import linear_token_logprobs, token_logprobs

# Ops whose modules import more (LPIPS networks) load on first use. A lazy name must differ from its module's name:
# importing the submodule sets the package attribute of that name to the module.
_LAZY = {
    "frame_reward": "rlvrw.ops.reward",
    "l1_lpips_reward": "rlvrw.ops.reward",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlvrw.ops' has no attribute {name!r}")


__all__ = sorted(_LAZY) + [
    "GRPOLoss",
    "GRPOOptions",
    "format_report",
    "fsq_codes_to_indices",
    "fsq_dequantize",
    "fsq_indices_to_codes",
    "fsq_quantize",
    "group_norm_silu",
    "group_advantages",
    "grpo_loss",
    "grpo_loss_from_logits",
    "linear_token_logprobs",
    "report",
    "rollout_correction_weights",
    "set_value_checks",
    "token_logprobs",
]
