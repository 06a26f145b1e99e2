"""OpenRLHF (0.11): ``PolicyLoss`` with OpenRLHF's constructor and call, computed by rlvrw's GRPO kernel.

A drop-in for ``openrlhf.models.PolicyLoss`` (openrlhf/models/loss.py): the same arguments, the same
``(loss, clip_ratio, ppo_kl, vllm_kl)``, the same values and gradients, and garbage at masked positions never reaches
them. It needs only torch: OpenRLHF itself is not imported (it does not install without CUDA). OpenRLHF's actor
builds its loss in ``openrlhf.trainer.ray.ppo_actor``; to use this one there::

    import openrlhf.trainer.ray.ppo_actor
    from rlvrw.integrations.openrlhf import PolicyLoss
    openrlhf.trainer.ray.ppo_actor.PolicyLoss = PolicyLoss

OpenRLHF's settings as ``rlvrw.ops.grpo_loss`` options: ``token_level_loss`` True / False is ``loss_agg``
"token-mean" / "seq-mean-token-mean" (fully masked sequences not counted), ``batch_num_tokens`` /
``global_batch_size`` are ``num_tokens`` / ``num_seqs``, ``policy_loss_type="gspo"`` is ``ratio_level="sequence"``
without a log-ratio clamp, and the vLLM importance-sampling correction (tis, icepop, seq-mask-tis) becomes
``rollout_is_weights``. Where OpenRLHF divides 0 by 0 (no valid token at all) the loss and metrics here are 0.
"""

from __future__ import annotations

import math

import torch

import rlvrw.ops as ops

POLICY_LOSS_TYPES = ("ppo", "gspo")
IS_CORRECTION_TYPES = ("tis", "icepop", "seq-mask-tis")
PPO_LOG_RATIO_CLAMP = 20.0


def _masked_mean(t: torch.Tensor, valid: torch.Tensor, dim=None) -> torch.Tensor:
    t = torch.where(valid, t, 0)
    if dim is None:
        return t.sum() / valid.sum().clamp(min=1)
    return t.sum(dim=dim) / valid.sum(dim=dim).clamp(min=1)


def vllm_is_weights(old_log_probs, rollout_log_probs, valid, correction_type: str, low: float, high: float):
    """OpenRLHF's vLLM importance-sampling coefficients pi_old / pi_rollout per token (detached, 0 where masked):
    "tis" clamps them to [low, high], "icepop" zeroes those outside [low, high], "seq-mask-tis" keeps them
    unclamped in the sequences whose geometric-mean ratio lies in [low, high] and zeroes the others."""
    log_ratio = torch.where(valid, old_log_probs - rollout_log_probs, 0).detach()
    ratio = log_ratio.exp()
    if correction_type == "tis":
        weights = ratio.clamp(min=low, max=high)
    elif correction_type == "icepop":
        weights = ratio * ((ratio >= low) & (ratio <= high))
    else:
        seq_ratio = _masked_mean(log_ratio, valid, dim=-1).exp()
        weights = ratio * ((seq_ratio >= low) & (seq_ratio <= high)).unsqueeze(-1)
    return torch.where(valid, weights, 0)


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's PPO / GSPO policy loss on rlvrw's kernel (see the module docstring).

    ``loss = agg(-min(r * A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) * A))``, for A < 0 capped at
    ``-dual_clip * A``, times the vLLM importance-sampling coefficient when enabled. "ppo": the token ratio
    ``exp(clamp(log_probs - old_log_probs, -20, 20))``; "gspo": the sequence's geometric mean ratio (against the
    rollout log-probs when the correction is enabled), with a per-sequence loss.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        enable_vllm_is_correction: bool = False,
        vllm_is_truncated_threshold: list | tuple | None = None,
        vllm_is_correction_type: str = "tis",
    ) -> None:
        super().__init__()
        if policy_loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(f"policy_loss_type must be one of {POLICY_LOSS_TYPES}, got {policy_loss_type!r}")
        if vllm_is_correction_type not in IS_CORRECTION_TYPES:
            raise ValueError(f"vllm_is_correction_type must be one of {IS_CORRECTION_TYPES}, got "
                             f"{vllm_is_correction_type!r}")
        if enable_vllm_is_correction and policy_loss_type == "ppo":
            if vllm_is_truncated_threshold is None or len(vllm_is_truncated_threshold) != 2:
                raise ValueError(f"vllm_is_truncated_threshold must be a pair [low, high] when "
                                 f"enable_vllm_is_correction is set, got {vllm_is_truncated_threshold!r}")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO is a per-sequence loss
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self.vllm_is_correction_type = vllm_is_correction_type
        # checks clip_eps_low, clip_eps_high and dual_clip now rather than at the first call
        ops.GRPOOptions(clip_low=clip_eps_low, clip_high=clip_eps_high, dual_clip=dual_clip)

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
    ):
        """log_probs, old_log_probs, action_mask, rollout_log_probs (B, T); advantages (B, T) or (B,); the global
        token count (token-level loss) or sequence count (per-sequence loss) and the data-parallel size make
        micro-batches and ranks add up to the big batch. Returns ``(loss, clip_ratio, ppo_kl, vllm_kl)``; vllm_kl is
        None unless the "ppo" correction is enabled."""
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        valid = action_mask != 0
        correct = self.enable_vllm_is_correction
        if correct and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required when enable_vllm_is_correction is set")
        if advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]
        options = dict(clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip)
        count = batch_num_tokens if self.token_level_loss else global_batch_size
        if self.token_level_loss:
            options.update(loss_agg="token-mean", num_tokens=batch_num_tokens)
        else:
            options.update(loss_agg="seq-mean-token-mean", num_seqs=global_batch_size)
        options["dp_size"] = 1 if count is None else int(dp_size)  # without a global count OpenRLHF ignores dp_size
        weights, vllm_kl, ratio_base = None, None, old_log_probs
        if self.policy_loss_type == "gspo":
            options.update(ratio_level="sequence", log_ratio_clamp=math.inf)
            if correct:  # GSPO's ratio is taken against the rollout policy instead of weighting by it
                ratio_base = rollout_log_probs
        else:
            options["log_ratio_clamp"] = PPO_LOG_RATIO_CLAMP
            if correct:
                low, high = self.vllm_is_truncated_threshold
                weights = vllm_is_weights(old_log_probs, rollout_log_probs, valid, self.vllm_is_correction_type,
                                          low, high)
                vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, valid).detach()
        loss, stats = ops.grpo_loss(log_probs, ratio_base, advantages, action_mask, rollout_is_weights=weights,
                                    **options)
        # OpenRLHF's ppo_kl is the unclamped mean of old_log_probs - log_probs (GSPO's too, whatever its ratio base)
        ppo_kl = _masked_mean(old_log_probs - log_probs.detach(), valid)
        return loss, stats["clip_frac"], ppo_kl, vllm_kl
