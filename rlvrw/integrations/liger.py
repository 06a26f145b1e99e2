"""Liger-Kernel (0.8.5): ``LigerFusedLinearGRPOLoss`` with Liger's constructor and call, on rlvrw's fused ops.

A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (what TRL and axolotl call): swap the import
and nothing else changes::

    from rlvrw.integrations.liger import LigerFusedLinearGRPOLoss   # was: from liger_kernel.chunked_loss import ...

The log-probs come from ``rlvrw.ops.linear_token_logprobs`` (hidden states and the output layer, never the (N, V)
logits), the loss from ``rlvrw.ops.grpo_loss``; values and gradients (of the hidden states, weight and bias) equal
Liger's, and so TRL's formulas. Liger itself is not imported. ``old_per_token_logps=None`` means on-policy (the
ratio is 1); the reference log-probs are given, or computed here from ``ref_input`` / ``ref_weight`` /
``ref_bias``; ``vllm_is_ratio`` is TRL's vLLM importance-sampling ratio.

Supported: the loss types grpo, bnpo, dr_grpo, dapo and luspo at token or sequence level, ``delta`` above
``1 + epsilon_high``, ``use_bias_correction_kl`` (the KL term weighted by the ratio, added in plain torch). Not
supported (a ValueError at construction): cispo, sapo, vespo.
Where this differs from Liger 0.8.5 it follows TRL: ``luspo`` sums over the valid tokens only (Liger also adds the
masked positions' terms when the loss varies along a sequence), and with ``importance_sampling_level="sequence"``
``vllm_is_ratio`` must hold one ratio per sequence.
"""

from __future__ import annotations

import torch

import rlvrw.ops as ops
from rlvrw import checks
from rlvrw.integrations import head_logprobs
from rlvrw.integrations._trl_options import ratio_weighted_kl, trl_loss_options


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _with_bias(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(hidden, weight) whose product adds ``bias``: a column of ones and the bias as one more input feature (a
    copy of both, only when there is a bias: ``linear_token_logprobs`` takes none)."""
    if bias is None:
        return hidden, weight
    ones = hidden.new_ones(hidden.shape[:-1] + (1,))
    return torch.cat([hidden, ones], dim=-1), torch.cat([weight, bias.to(weight.dtype)[:, None]], dim=1)


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Liger's fused linear GRPO loss (the same constructor and ``forward``) on rlvrw's ops; see the module
    docstring. ``compiled`` and ``chunk_size`` are accepted and unused (rlvrw chunks by rows itself); the
    ``sapo_*`` and ``vespo_*`` parameters belong to loss types not supported here."""

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ):
        super().__init__()
        checks.positive("temperature", temperature)
        self.options = trl_loss_options(loss_type, epsilon_low, epsilon_high, beta, delta, importance_sampling_level,
                                        max_completion_length)
        self.beta = beta
        self.use_ref_model = use_ref_model
        self.use_bias_correction_kl = bool(use_bias_correction_kl)
        self.loss_type = loss_type
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.importance_sampling_level = importance_sampling_level
        self.temperature = float(temperature)
        self.compiled, self.chunk_size = compiled, chunk_size

    def _logprobs(self, hidden, weight, bias, tokens):
        hidden, weight = _with_bias(hidden.to(weight.dtype), weight, bias)
        return head_logprobs(hidden, weight, tokens, self.temperature)

    def _normalizer(self, valid: torch.Tensor, num_items_in_batch) -> dict:
        """The per-batch counts: dapo divides by ``max(num_items_in_batch / world_size, 1)`` (else the valid tokens of
        all ranks / world_size) as Liger does; the other loss types by this batch's rows or valid tokens."""
        if self.loss_type != "dapo":
            return {}
        world = _world_size()
        if num_items_in_batch is None:
            count = valid.sum().to(torch.float32)
            if world > 1:
                count = count.clone()
                torch.distributed.all_reduce(count)
        else:
            count = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=valid.device)
        return {"num_tokens": (count / world).clamp(min=1)}

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        """_input (B, T, H) hidden states, lin_weight (V, H), bias (V,) or None, selected_token_ids and
        attention_mask (B, T), advantages (B,). Returns ``(loss, metrics)``: metrics are the mean k3 KL over the valid
        tokens (when ``beta != 0``) and the fraction of valid tokens whose ratio was clipped, as Liger's."""
        if _input.dim() != 3:
            raise ValueError(f"_input must be (B, T, H) hidden states, got shape {tuple(_input.shape)}")
        valid = attention_mask != 0
        tokens = torch.where(valid, selected_token_ids, torch.zeros_like(selected_token_ids))
        logp = self._logprobs(_input, lin_weight, bias, tokens)
        ref_logp = None
        if self.use_ref_model:
            if ref_per_token_logps is None and ref_input is None:
                raise ValueError("use_ref_model is set: pass ref_per_token_logps, or ref_input and ref_weight")
            if ref_per_token_logps is None:
                with torch.no_grad():
                    ref_logp = self._logprobs(ref_input, ref_weight, ref_bias, tokens)
            else:
                ref_logp = ref_per_token_logps
        old_logp = logp.detach() if old_per_token_logps is None else old_per_token_logps
        weights = None
        if vllm_is_ratio is not None:
            weights = vllm_is_ratio
            if weights.dim() == 2 and weights.shape[1] == 1:
                weights = weights[:, 0]
            if weights.dim() == 2 and self.importance_sampling_level == "sequence":
                raise ValueError("with importance_sampling_level='sequence', vllm_is_ratio must be one ratio per "
                                 f"sequence, (B,) or (B, 1), got shape {tuple(vllm_is_ratio.shape)}")
        options = dict(self.options, **self._normalizer(valid, num_items_in_batch))
        weighted_kl = ref_logp is not None and self.use_bias_correction_kl and self.beta != 0
        if ref_logp is None or weighted_kl:
            options["kl_coef"] = 0.0  # no reference: Liger compares with the policy itself, a KL of 0, no gradient
        loss, _ = ops.grpo_loss(logp, old_logp, advantages, attention_mask, None if weighted_kl else ref_logp,
                                rollout_is_weights=weights, **options)
        kl = None
        if weighted_kl:
            kl_loss, kl = ratio_weighted_kl(logp, old_logp, ref_logp, valid, options)
            loss = loss + self.beta * kl_loss
        return loss, self._metrics(logp.detach(), old_logp, ref_logp, kl, advantages, valid)

    def _metrics(self, logp, old_logp, ref_logp, kl, advantages, valid) -> tuple[torch.Tensor, ...]:
        n = valid.sum().clamp(min=1)
        log_ratio = torch.where(valid, logp - old_logp, 0)
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio.sum(-1) / valid.sum(-1).clamp(min=1)).unsqueeze(-1)
        ratio = log_ratio.exp()
        adv = advantages.unsqueeze(-1)
        clipped = ((ratio < 1 - self.epsilon_low) & (adv < 0)) | ((ratio > 1 + self.epsilon_high) & (adv > 0))
        metrics = [(clipped & valid).sum() / n]
        if self.beta != 0:
            if ref_logp is None:
                kl_mean = torch.zeros((), dtype=logp.dtype, device=logp.device)
            else:
                if kl is None:
                    diff = torch.where(valid, ref_logp - logp, 0)
                    kl = diff.exp() - diff - 1
                kl_mean = torch.where(valid, kl, 0).sum() / n
            metrics.insert(0, kl_mean)
        return tuple(m.to(torch.float32) for m in metrics)
