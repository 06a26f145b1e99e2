"""The GRPO step as the public trainers write it in eager PyTorch: the ``eager`` baselines that bench/ times.

Not a spec (that is ``rlvrw.reference.grpo``) and not what the tests compare against (they run the installed VERL,
TRL and Liger functions themselves, see tests/test_grpo_peers.py). These keep the peers' habits, which is what a
benchmark of "the eager way" should time: a full (N, V) log-softmax, masks applied by multiplication, the policy and
KL terms aggregated separately. Formulas as VERL 0.9.1's ``compute_policy_loss_vanilla`` + ``kl_penalty`` +
``agg_loss`` (token-mean and the seq-mean modes, fully masked rows left out of the sequence mean) and TRL 1.16's
``bnpo`` loss.
"""

from __future__ import annotations

import torch


def verl_logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _verl_agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    counts = mask.sum(dim=-1)
    seq_losses = (loss_mat * mask).sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (counts + 1e-8)
    nonempty = (counts > 0).float()
    return (seq_losses * nonempty).sum() / nonempty.sum()


def verl_grpo_step_loss(
    logits, tokens, old_log_prob, ref_log_prob, advantages, response_mask, clip_low=0.2, clip_high=0.2,
    clip_ratio_c=3.0, kl_coef=1e-3, kl_type="low_var_kl", loss_agg_mode="token-mean", temperature=1.0,
):
    """What a VERL actor update computes for one micro-batch from logits: log-probs, the dual-clip PPO loss, the k3
    KL loss (``kl_type`` is VERL's ``low_var_kl`` only), each aggregated with ``loss_agg_mode``."""
    if kl_type not in ("low_var_kl", "k3"):
        raise ValueError(f"kl_type must be 'low_var_kl' (k3) in this eager baseline, got {kl_type!r}")
    log_prob = verl_logprobs_from_logits(logits / temperature, tokens)
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
    pg_losses = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    pg_losses = torch.where(advantages < 0, torch.min(-advantages * clip_ratio_c, pg_losses), pg_losses)
    kl = torch.clamp(ref_log_prob - log_prob, min=-20, max=20)
    kld = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    return (_verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
            + kl_coef * _verl_agg_loss(kld, response_mask, loss_agg_mode))


def trl_grpo_step_loss(logits, tokens, old_logp, ref_logp, advantages, mask, beta=1e-3, temperature=1.0,
                       epsilon_low=0.2, epsilon_high=0.2):
    """TRL's path from logits: per-token log-probs by a full log-softmax, then the ``bnpo`` loss; advantages (B,)."""
    logps = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    coef_1 = torch.exp(logps - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    if beta != 0.0:
        delta = ref_logp - logps
        per_token_loss = per_token_loss + beta * (torch.exp(delta) - delta - 1)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
