"""GRPO: group-relative advantages and the clipped-ratio policy loss with a KL penalty, from log-probs or logits.

Formulas and the deliberate differences from VERL/TRL are in ``rlvrw.reference.grpo``; the mapping of TRL's loss
types onto these options is in ``rlvrw.reference.peers``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlvrw import reference
from rlvrw.ops import _backend, _checks
from rlvrw.ops._primitives import logits_passes
from rlvrw.ops.logprobs import _check_temperature, logits_rows, resolve_logits_backend
from rlvrw.reference.grpo import ADVANTAGE_SCALES, KL_TYPES, LOSS_AGGS, RATIO_LEVELS
from rlvrw.reference.logprobs import compute_dtype

MAX_GROUP_SIZE = 4096


class GroupAdvantagesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size, eps, scale):
        from rlvrw.kernels import grpo_loss as kernels

        ctx.save_for_backward(rewards)
        ctx.group_size, ctx.eps, ctx.scale = group_size, eps, scale
        return kernels.group_advantages(rewards, group_size, eps, scale)

    @staticmethod
    def backward(ctx, grad_adv):
        from rlvrw.kernels import grpo_loss as kernels

        (rewards,) = ctx.saved_tensors
        grad = kernels.group_advantages_backward(grad_adv.contiguous(), rewards, ctx.group_size, ctx.eps, ctx.scale)
        return grad.to(rewards.dtype), None, None, None


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: str = "group", *, backend: str | None = None
) -> torch.Tensor:
    """GRPO's group-relative advantages: ``(r - mean_g) / (std_g + eps)``; rewards (B*G,) laid out group by group.

    scale: ``"group"`` (unbiased std of the group, as VERL), ``"batch"`` (unbiased std of all rewards, as TRL's
    ``scale_rewards="batch"``), ``"none"`` (Dr. GRPO: centered only). A group of one gets 0. Differentiable in the
    rewards; float32 out (float64 for float64 rewards).
    """
    _checks.tensor("rewards", rewards, dims=(1,))
    if not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be an int in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rewards ({rewards.numel()})")
    _checks.positive("eps", eps, allow_zero=True)
    _checks.choice("scale", scale, ADVANTAGE_SCALES)
    name = _backend.resolve("group_advantages", rewards.device, backend)
    if name == "reference":
        return reference.group_advantages(rewards, group_size, eps, scale)
    return GroupAdvantagesFunction.apply(rewards.contiguous(), group_size, float(eps), scale)


@dataclass(frozen=True)
class GRPOOptions:
    """The options of ``grpo_loss`` and ``grpo_loss_from_logits`` (see ``grpo_loss``), validated on creation."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_type: str = "k3"
    loss_agg: str = "token-mean"
    num_tokens: int | float | torch.Tensor | None = None
    num_seqs: int | float | torch.Tensor | None = None
    norm_length: int | float | None = None
    log_ratio_clamp: float = 20.0
    ratio_level: str = "token"

    def __post_init__(self):
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low!r}")
        _checks.positive("clip_high", self.clip_high, allow_zero=True)
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be None or > 1 (a bound on the ratio), got {self.dual_clip!r}")
        _checks.choice("kl_type", self.kl_type, KL_TYPES)
        _checks.choice("loss_agg", self.loss_agg, LOSS_AGGS)
        _checks.choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _checks.positive("log_ratio_clamp", self.log_ratio_clamp)
        for name in ("num_tokens", "num_seqs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                _checks.positive(name, value)
        if self.norm_length is not None:
            _checks.positive("norm_length", self.norm_length)

    @classmethod
    def from_kwargs(cls, function: str, options: dict) -> GRPOOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        _checks.no_unknown_options(function, {k: v for k, v in options.items() if k not in known}, known)
        return cls(**options)

    def as_kwargs(self) -> dict:
        # not dataclasses.asdict: that deep-copies tensors such as a device-side num_tokens
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_loss_inputs(old_logp, advantages, mask, ref_logp, bt: tuple[int, int], opts: GRPOOptions):
    _checks.tensor("old_logp", old_logp, dims=(2,))
    _checks.shape("old_logp", old_logp, bt, "(B, T)")
    _checks.tensor("advantages", advantages, dims=(1, 2))
    if advantages.dim() == 1:
        _checks.shape("advantages", advantages, bt[:1], "(B,) per sequence, or (B, T) per token")
    else:
        _checks.shape("advantages", advantages, bt, "(B,) per sequence, or (B, T) per token")
    _checks.tensor("mask", mask, dims=(2,), dtypes=None)
    _checks.shape("mask", mask, bt, "(B, T)")
    if ref_logp is not None:
        _checks.tensor("ref_logp", ref_logp, dims=(2,))
        _checks.shape("ref_logp", ref_logp, bt, "(B, T)")
    elif opts.kl_coef != 0:
        raise ValueError(f"ref_logp is required when kl_coef != 0 (kl_coef={opts.kl_coef})")


def _stats(row_stats: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = row_stats.detach().sum(dim=0)
    n_valid = rows[5].clamp(min=1)
    return {
        "pg_loss": rows[0],
        "kl": rows[1],
        "clip_frac": rows[2] / n_valid,
        "clip_frac_lower": rows[3] / n_valid,
        "approx_kl": rows[4] / n_valid,
    }


def _token_loss(logp2d, old_logp, advantages, valid, ref_logp, opts: GRPOOptions):
    """Run the Triton token-loss kernel: (dloss/dlogp, row stats); see ``kernels/grpo_loss.py``."""
    from rlvrw.kernels import grpo_loss as kernels

    row_scale = reference.aggregation_row_scale(
        valid, opts.loss_agg, opts.num_tokens, opts.num_seqs, opts.norm_length, logp2d.dtype
    )
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return kernels.grpo_token_loss(
        logp2d, old_logp, adv.expand(logp2d.shape), valid, ref_logp, row_scale,
        clip_low=opts.clip_low, clip_high=opts.clip_high, dual_clip=opts.dual_clip, kl_coef=opts.kl_coef,
        kl_type=opts.kl_type, log_ratio_clamp=opts.log_ratio_clamp,
        sequence_ratio=opts.ratio_level == "sequence",
    )


def _loss_from_rows(row_stats: torch.Tensor, kl_coef: float) -> torch.Tensor:
    return row_stats[:, 0].sum() + kl_coef * row_stats[:, 1].sum()


class GRPOLossFunction(torch.autograd.Function):
    """Loss over (B, T) log-probs; the kernel computes d(loss)/d(logp) in the forward, the backward scales it."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, valid, ref_logp, opts):
        dlogp, row_stats = _token_loss(logp.to(compute_dtype(logp.dtype)), old_logp, advantages, valid, ref_logp, opts)
        ctx.save_for_backward(dlogp)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(row_stats)
        return _loss_from_rows(row_stats, opts.kl_coef), row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_rows):
        (dlogp,) = ctx.saved_tensors
        return (dlogp * grad_loss).to(ctx.logp_dtype), None, None, None, None, None


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/PPO clipped-ratio loss with a KL penalty over token log-probs.

    logp, old_logp, mask, ref_logp: (B, T); advantages (B,) or (B, T); mask nonzero marks the tokens that count.
    Returns ``(loss, stats)``; stats are 0-d device tensors (pg_loss, kl, clip_frac, clip_frac_lower, approx_kl),
    made without a host sync. Gradients flow to ``logp`` only.

    Options (keyword, see ``rlvrw.reference.grpo`` for the formulas):
      clip_low=0.2, clip_high=0.2   ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher: clip_high > clip_low)
      dual_clip=None                c > 1 caps the loss of negative advantages at -A*c (VERL's clip_ratio_c)
      kl_coef=0.0, kl_type="k3"     "k1" "k2" "k3" "abs", and "k1+" "k3+" (value of k, gradient of k2)
      loss_agg="token-mean"         "token-mean" "seq-mean-token-sum" "seq-mean-token-mean" "seq-mean-token-sum-norm"
      num_tokens=None               global token count for token-mean (micro-batches / ranks sum to the big batch)
      num_seqs=None                 global sequence count for the seq-mean modes (default B)
      norm_length=None              the constant of seq-mean-token-sum-norm (Dr. GRPO); default T
      log_ratio_clamp=20.0          |log ratio| clamp before every exp
      ratio_level="token"           "token", or "sequence" (GSPO: the ratio is the geometric mean over the sequence)
    """
    opts = GRPOOptions.from_kwargs("grpo_loss", options)
    _checks.tensor("logp", logp, dims=(2,))
    _check_loss_inputs(old_logp, advantages, mask, ref_logp, tuple(logp.shape), opts)
    device = _checks.same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    name = _backend.resolve("grpo_loss", device, backend)
    if name == "reference":
        return reference.grpo_loss(logp, old_logp, advantages, mask, ref_logp, **opts.as_kwargs())
    loss, row_stats = GRPOLossFunction.apply(logp, old_logp, advantages, mask != 0, ref_logp, opts)
    return loss, _stats(row_stats)


class GRPOLossFromLogitsFunction(torch.autograd.Function):
    """One pass over the logits forward (log-probs), the token-loss kernel, one pass backward (d(logits), optionally
    written over the logits). Nothing (N, V) is allocated besides the logits themselves when in place."""

    @staticmethod
    def forward(ctx, logits2d, tokens1d, old_logp, advantages, valid, ref_logp, inv_temperature, opts, inplace, backend):
        passes = logits_passes(backend)
        logp, lse, _ = passes.logits_forward(logits2d, tokens1d, inv_temperature, False)
        dlogp, row_stats = _token_loss(logp.view(valid.shape), old_logp, advantages, valid, ref_logp, opts)
        ctx.save_for_backward(logits2d, tokens1d, lse, dlogp)
        ctx.passes, ctx.inv_temperature, ctx.inplace = passes, inv_temperature, inplace
        ctx.mark_non_differentiable(row_stats)
        return _loss_from_rows(row_stats, opts.kl_coef), row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_rows):
        logits2d, tokens1d, lse, dlogp = ctx.saved_tensors
        grad_logits = ctx.passes.logits_backward(
            logits2d, tokens1d, ctx.inv_temperature, lse, (dlogp * grad_loss).reshape(-1),
            out=logits2d if ctx.inplace else None,
        )
        return grad_logits, None, None, None, None, None, None, None, None, None


def grpo_loss_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    inplace_backward: bool = True,
    backend: str | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo_loss(token_logprobs(logits, tokens, temperature), ...)``, fused: logits (B, T, V), tokens (B, T).

    The backward writes d(logits) over the logits (``inplace_backward=True``, the default: the logits are consumed,
    as in Liger's fused losses); pass False when the logits are needed afterwards. Token ids at masked positions
    are ignored (padding such as -100 is fine there). Options as ``grpo_loss``.
    """
    opts = GRPOOptions.from_kwargs("grpo_loss_from_logits", options)
    _checks.tensor("logits", logits, dims=(3,))
    _checks.tensor("tokens", tokens, dtypes=_checks.INDEX_DTYPES)
    bt = tuple(logits.shape[:2])
    _checks.shape("tokens", tokens, bt, "logits.shape[:2]")
    _check_loss_inputs(old_logp, advantages, mask, ref_logp, bt, opts)
    temperature = _check_temperature(temperature)
    device = _checks.same_device(
        logits=logits, tokens=tokens, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp
    )
    valid = mask != 0
    vocab = logits.shape[-1]
    _checks.token_ids("tokens", tokens, vocab, valid)
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    tokens1d = tokens.reshape(-1)
    name = resolve_logits_backend("grpo_loss_from_logits", logits, tokens1d, backend)
    if name == "reference":
        return reference.grpo_loss_from_logits(
            logits, tokens, old_logp, advantages, mask, ref_logp, temperature, **opts.as_kwargs()
        )
    loss, row_stats = GRPOLossFromLogitsFunction.apply(
        logits_rows(logits), tokens1d, old_logp, advantages, valid, ref_logp, 1.0 / temperature, opts,
        inplace_backward, name,
    )
    return loss, _stats(row_stats)


class GRPOLoss(torch.nn.Module):
    """Module form of ``grpo_loss`` (``from_logits=False``) or ``grpo_loss_from_logits``, holding the options."""

    def __init__(self, from_logits: bool = False, temperature: float = 1.0, **options):
        super().__init__()
        self.options = GRPOOptions.from_kwargs("GRPOLoss", options)
        self.from_logits = from_logits
        self.temperature = _check_temperature(temperature)

    def forward(self, *inputs, ref_logp=None):
        kwargs = self.options.as_kwargs()
        if self.from_logits:
            logits, tokens, old_logp, advantages, mask = inputs
            return grpo_loss_from_logits(
                logits, tokens, old_logp, advantages, mask, ref_logp, self.temperature, **kwargs
            )
        logp, old_logp, advantages, mask = inputs
        return grpo_loss(logp, old_logp, advantages, mask, ref_logp, **kwargs)
