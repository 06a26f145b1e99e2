"""VERL (0.9.1): rlvrw's GRPO loss as a VERL policy loss, and the fused log-prob + entropy of VERL's actor forward.

Importing this module registers two policy losses with VERL's ``register_policy_loss``:

* ``"rlvrw_grpo"``: VERL's ``vanilla`` loss (``compute_policy_loss_vanilla``: clip ratios, dual clip at
  ``clip_ratio_c``, log ratio clamped to [-20, 20]),
* ``"rlvrw_gspo"``: VERL's ``gspo`` loss (sequence-level ratio, its log clamped at 10 from above, no dual clip),

each with VERL's signature, aggregated by ``loss_agg_mode`` with the actor's ``global_batch_info`` as VERL's
``agg_loss`` does, weighted by ``rollout_is_weights``, and returning VERL's metrics (``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower``). Values and gradients equal VERL's, computed by rlvrw's GRPO kernel;
garbage at masked positions does not reach them. VERL's actor adds the KL and entropy terms itself.

VERL imports the module named by ``actor_rollout_ref.model.external_lib`` in each of its workers::

    actor_rollout_ref.model.external_lib=rlvrw.integrations.verl
    actor_rollout_ref.actor.policy_loss.loss_mode=rlvrw_grpo

``linear_cross_entropy`` has the signature and outputs of VERL's fused kernel
(``verl.utils.kernel.linear_cross_entropy``, the Triton backend of ``actor_rollout_ref.model.use_fused_kernels``):
log-probs and entropies from hidden states and ``lm_head.weight`` without the (N, V) logits, on
``rlvrw.ops.linear_token_logprobs``. ``use_fused_kernels()`` makes VERL's Hugging Face models call it.
"""

from __future__ import annotations

import math

import torch

import rlvrw.ops as ops
from rlvrw.integrations import head_logprobs, missing_framework

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:
    raise missing_framework(__name__, "VERL", "verl", exc) from exc

LOSS_MODE = "rlvrw_grpo"
GSPO_LOSS_MODE = "rlvrw_gspo"
GSPO_LOG_RATIO_CLAMP = (-math.inf, 10.0)  # VERL's gspo clamps the sequence log ratio from above only


def _clip_ratios(config) -> tuple[float, float]:
    """(low, high): ``clip_ratio_low`` / ``clip_ratio_high``, each falling back to ``clip_ratio`` as VERL's do."""
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def aggregation_options(config, loss_agg_mode: str) -> dict:
    """``grpo_loss`` options of VERL's ``agg_loss(loss_agg_mode, **config.global_batch_info)``: ``batch_num_tokens``
    is ``num_tokens``, ``global_batch_size`` is ``num_seqs``, ``loss_scale_factor`` is ``norm_length`` (of
    seq-mean-token-sum-norm), ``dp_size`` is ``dp_size``; fully masked sequences are not counted, as in VERL."""
    info = getattr(config, "global_batch_info", None) or {}
    options = dict(
        loss_agg=loss_agg_mode,
        dp_size=int(info.get("dp_size") or 1),
        num_tokens=info.get("batch_num_tokens"),
        num_seqs=info.get("global_batch_size"),
    )
    if loss_agg_mode == "seq-mean-token-sum-norm":
        options["norm_length"] = info.get("loss_scale_factor")
    needed = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    if options["dp_size"] > 1 and loss_agg_mode != "token-sum" and info.get(needed) is None:
        raise ValueError(f"global_batch_info[{needed!r}] (the global count) is required with "
                         f"loss_agg_mode={loss_agg_mode!r} when dp_size > 1 (dp_size={options['dp_size']})")
    return options


def _metrics(clip_frac: torch.Tensor, ppo_kl: torch.Tensor, clip_frac_lower: torch.Tensor) -> dict[str, float]:
    # one host sync for the three (VERL makes three)
    clip_frac, ppo_kl, clip_frac_lower = torch.stack([clip_frac, ppo_kl, clip_frac_lower]).tolist()
    return {"actor/pg_clipfrac": clip_frac, "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": clip_frac_lower}


def _require_config(config):
    if config is None:
        raise ValueError("config (VERL's ActorConfig, or its DictConfig) is required: it holds the clip ratios")
    return config


@core_algos.register_policy_loss(LOSS_MODE)
def compute_policy_loss_rlvrw(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VERL's ``compute_policy_loss_vanilla`` on rlvrw's GRPO kernel; same arguments, loss and metrics.

    ``pg = max(-A * r, -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))``, capped at ``-A * clip_ratio_c``
    where A < 0, times ``rollout_is_weights``; ``r = exp(clamp(log_prob - old_log_prob, -20, 20))``; aggregated by
    ``loss_agg_mode`` with ``config.global_batch_info`` (``aggregation_options``).
    """
    config = _require_config(config)
    low, high = _clip_ratios(config)
    loss, stats = ops.grpo_loss(
        log_prob, old_log_prob, advantages, response_mask, rollout_is_weights=rollout_is_weights,
        clip_low=low, clip_high=high, dual_clip=config.get("clip_ratio_c", 3.0),
        **aggregation_options(config, loss_agg_mode),
    )
    return loss, _metrics(stats["clip_frac"], stats["approx_kl"], stats["clip_frac_lower"])


@core_algos.register_policy_loss(GSPO_LOSS_MODE)
def compute_policy_loss_rlvrw_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VERL's ``compute_policy_loss_gspo`` on rlvrw's GRPO kernel; same arguments, loss and metrics.

    The ratio of a sequence is ``exp(min(mean_t(log_prob - old_log_prob), 10))``, with the gradient of each token's
    own log-prob; clipped as ``rlvrw_grpo`` without the dual clip. ``actor/ppo_kl`` is the unclamped token mean of
    ``old_log_prob - log_prob``, ``actor/pg_clipfrac_lower`` 0, as VERL's.
    """
    config = _require_config(config)
    low, high = _clip_ratios(config)
    loss, stats = ops.grpo_loss(
        log_prob, old_log_prob, advantages, response_mask, rollout_is_weights=rollout_is_weights,
        clip_low=low, clip_high=high, dual_clip=None, ratio_level="sequence", log_ratio_clamp=GSPO_LOG_RATIO_CLAMP,
        **aggregation_options(config, loss_agg_mode),
    )
    valid = response_mask != 0
    neg_log_ratio = torch.where(valid, old_log_prob - log_prob.detach(), 0)
    ppo_kl = neg_log_ratio.sum() / valid.sum().clamp(min=1)
    return loss, _metrics(stats["clip_frac"], ppo_kl.to(stats["clip_frac"].dtype), stats["clip_frac_lower"])


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VERL's fused ``linear_cross_entropy`` on ``rlvrw.ops.linear_token_logprobs``: ``(log_probs, entropy)`` of
    ``softmax(hidden @ weight.T / temperature)`` at ``labels``, without the (N, V) logits; both differentiable in
    ``hidden`` and ``weight``.

    hidden (N, H) or (B, T, H), weight (V, H), labels (N,) or (B, T) token ids. Outputs have the labels' shape
    (VERL's kernel returns them flattened; its callers accept either), float32 (float64 for float64 weights),
    computed outside autocast in the weight's dtype, as VERL's kernel computes in its inputs' dtype.
    ``reduction`` must be "none", as VERL's actor calls it; a vocabulary split over a process group
    (``dist_process_group`` of more than one rank, Megatron's tensor parallelism) is not supported.
    """
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token log-probs and entropies), got {reduction!r}")
    if dist_process_group is not None and torch.distributed.get_world_size(dist_process_group) > 1:
        raise NotImplementedError("linear_cross_entropy: a vocabulary split over a process group (tensor "
                                  "parallelism) is not supported; pass the full lm_head weight")
    return head_logprobs(hidden, weight, labels, temperature, return_entropy=True)


def use_fused_kernels() -> None:
    """Route VERL's fused-kernel forward of Hugging Face models (``actor_rollout_ref.model.use_fused_kernels=True``
    with ``fused_kernel_options.impl_backend=triton``) through ``linear_cross_entropy`` in this process.

    VERL's models import its kernel at each call (``verl.models.transformers.dense_common`` and the VL models), so
    replacing the module's function is enough. Call it where the model runs: in VERL's workers, from a module named
    by ``actor_rollout_ref.model.external_lib``.
    """
    from verl.utils.kernel import linear_cross_entropy as kernel_module

    kernel_module.linear_cross_entropy = linear_cross_entropy
