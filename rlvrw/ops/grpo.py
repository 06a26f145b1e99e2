"""GRPO: group-relative advantages and the clipped-ratio policy loss with a KL penalty, from log-probs or logits.

Formulas and the few differences from the peers (all where a peer gives NaN) are in ``rlvrw.reference.grpo``. The
peers' settings, as options of ``grpo_loss`` (values and gradients equal theirs; the tests run the installed
packages' own functions):

VERL 0.9.1 (``actor_rollout_ref.actor`` config, the arguments of its policy-loss functions)
  ``policy_loss.loss_mode`` vanilla / gspo         ``ratio_level="token"`` / ``"sequence"`` (GSPO: ``dual_clip=None``,
                                                    ``log_ratio_clamp=(-inf, 10)``)
  ``clip_ratio_low``, ``clip_ratio_high``           ``clip_low``, ``clip_high``
  ``clip_ratio_c`` (vanilla: always on, 3.0)        ``dual_clip``
  ``loss_agg_mode``                                 ``loss_agg`` (the same names)
  ``global_batch_info``: ``batch_num_tokens``,      ``num_tokens``, ``num_seqs``, ``dp_size``, ``norm_length``
  ``global_batch_size``, ``dp_size``, ``loss_scale_factor``
  ``kl_loss_coef``, ``kl_loss_type``                ``kl_coef``, ``kl_type`` (kl, mse, low_var_kl = k1, k2, k3)
  ``rollout_is_weights``                            ``rollout_is_weights`` (``rollout_correction_weights`` makes them)
  ``entropy_coeff``                                 ``return_entropy=True``, aggregated with the same options
TRL 1.16 ``GRPOConfig`` (and Liger 0.8.5's ``LigerFusedLinearGRPOLoss``, the same formulas)
  ``loss_type="grpo"``                              ``"seq-mean-token-mean"``, ``count_empty_seqs=True``
  ``"bnpo"``                                        ``"token-mean"``
  ``"dr_grpo"``                                     ``"seq-mean-token-sum-norm"``, ``count_empty_seqs=True``,
                                                    ``norm_length=max_completion_length``
  ``"dapo"``                                        ``"token-mean"``, ``num_tokens=max(num_items_in_batch, 1) *
                                                    grad_accum_steps / steps_per_generation``, ``dp_size=num_processes``
  ``"luspo"``                                       ``"seq-mean-token-sum"``, ``count_empty_seqs=True``
  (grpo, bnpo, dr_grpo, luspo divide by the gradient-accumulation steps: divide the loss, or multiply num_seqs /
  num_tokens by them)
  ``epsilon``, ``epsilon_high``, ``delta``          ``clip_low``, ``clip_high``, ``dual_clip`` (for delta > 1 + epsilon_high)
  ``beta``                                          ``kl_coef``, ``kl_type="k3"``, ``kl_clamp=inf``,
                                                    ``log_ratio_clamp=inf`` (TRL clamps neither)
  ``importance_sampling_level``                     ``ratio_level``
  vLLM ``importance_sampling_ratio``                ``rollout_is_weights``; with ``ratio_level="sequence"`` per sequence
                                                    only: for weights that vary along a sequence TRL differentiates the
                                                    sequence ratio itself, VERL and rlvrw each token's own term (the
                                                    same loss, another gradient)
  not here: cispo, sapo, vespo, ``use_bias_correction_kl``, ``top_entropy_quantile``, ``off_policy_mask_threshold``
OpenRLHF ``PolicyLoss`` (0.11)
  ``clip_eps_low``, ``clip_eps_high``, ``dual_clip``  ``clip_low``, ``clip_high``, ``dual_clip``
  ``token_level_loss`` True / False                 ``"token-mean"`` / ``"seq-mean-token-mean"``
  ``batch_num_tokens``, ``global_batch_size``, ``dp_size``  ``num_tokens``, ``num_seqs``, ``dp_size``
  ``policy_loss_type="gspo"``                       ``ratio_level="sequence"``, ``"seq-mean-token-mean"``,
                                                    ``log_ratio_clamp=inf``
  the IS-correction coefficient                     ``rollout_is_weights``
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlvrw import reference
from rlvrw import checks
from rlvrw.ops import _backend
from rlvrw.ops._primitives import logits_passes
from rlvrw.ops.logprobs import logits_rows, resolve_logits_backend
from rlvrw.reference.grpo import (
    ADVANTAGE_SCALES,
    K3_VALUE_CLAMP,
    KL_TYPES,
    LOSS_AGGS,
    RATIO_LEVELS,
    ROLLOUT_IS_LEVELS,
    k3_exponent_bounds,
    log_ratio_bounds,
)
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
    ``scale_rewards="batch"``), ``"none"`` (Dr. GRPO: centered only). A group of one, or of equal rewards, gets 0
    (also with ``eps=0``). Differentiable in the rewards; float32 out (float64 for float64 rewards). VERL:
    ``norm_adv_by_std_in_grpo`` True / False is ``"group"`` / ``"none"``, its ``epsilon`` is ``eps``.
    """
    checks.tensor("rewards", rewards, dims=(1,))
    group_size = checks.integer("group_size", group_size, high=MAX_GROUP_SIZE)
    if rewards.numel() % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rewards ({rewards.numel()})")
    eps = checks.number("eps", eps, low=0)
    checks.choice("scale", scale, ADVANTAGE_SCALES)
    name = _backend.resolve("group_advantages", rewards.device, backend)
    if name == "reference":
        return reference.group_advantages(rewards, group_size, eps, scale)
    return GroupAdvantagesFunction.apply(rewards.contiguous(), group_size, float(eps), scale)


def _check_count(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return
    checks.number(name, value, low=0, low_open=True)


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
    log_ratio_clamp: float | tuple[float, float] = 20.0
    ratio_level: str = "token"
    dp_size: int = 1
    count_empty_seqs: bool = False
    kl_clamp: float = K3_VALUE_CLAMP

    def __post_init__(self):
        checks.number("clip_low", self.clip_low, low=0, high=1, high_open=True)
        checks.number("clip_high", self.clip_high, low=0)
        if self.dual_clip is not None:
            checks.number("dual_clip", self.dual_clip, low=1, low_open=True)
        checks.number("kl_coef", self.kl_coef, low=0)
        checks.choice("kl_type", self.kl_type, KL_TYPES)
        checks.choice("loss_agg", self.loss_agg, LOSS_AGGS)
        checks.choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        if isinstance(self.log_ratio_clamp, (tuple, list)):
            if len(self.log_ratio_clamp) != 2:
                raise ValueError(f"log_ratio_clamp must be a number c > 0 or a pair (low, high), got "
                                 f"{self.log_ratio_clamp!r}")
            checks.number("log_ratio_clamp[0]", self.log_ratio_clamp[0], high=0, high_open=True, finite=False)
            checks.number("log_ratio_clamp[1]", self.log_ratio_clamp[1], low=0, low_open=True, finite=False)
        else:
            checks.number("log_ratio_clamp", self.log_ratio_clamp, low=0, low_open=True, finite=False)
        checks.number("kl_clamp", self.kl_clamp, low=0, low_open=True, finite=False)
        _check_count("num_tokens", self.num_tokens)
        _check_count("num_seqs", self.num_seqs)
        if self.norm_length is not None:
            checks.number("norm_length", self.norm_length, low=0, low_open=True)
        checks.integer("dp_size", self.dp_size)
        checks.boolean("count_empty_seqs", self.count_empty_seqs)
        if self.dp_size > 1:
            # a local count times dp_size is no normalizer: VERL refuses this too
            needed = "num_tokens" if self.loss_agg == "token-mean" else "num_seqs"
            if self.loss_agg != "token-sum" and getattr(self, needed) is None:
                raise ValueError(f"{needed} (the global count) is required with loss_agg={self.loss_agg!r} when "
                                 f"dp_size > 1 (dp_size={self.dp_size})")

    @classmethod
    def from_kwargs(cls, function: str, options: dict) -> GRPOOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        checks.no_unknown_options(function, {k: v for k, v in options.items() if k not in known}, known)
        return cls(**options)

    def as_kwargs(self) -> dict:
        # not dataclasses.asdict: that deep-copies tensors such as a device-side num_tokens
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_loss_inputs(old_logp, advantages, mask, ref_logp, rollout_is_weights, bt: tuple[int, int], opts):
    checks.tensor("old_logp", old_logp, dims=(2,))
    checks.shape("old_logp", old_logp, bt, "(B, T)")
    for name, t in (("advantages", advantages), ("rollout_is_weights", rollout_is_weights)):
        if t is None:
            continue
        checks.tensor(name, t, dims=(1, 2))
        checks.shape(name, t, bt[:t.dim()], "(B,) per sequence, or (B, T) per token")
    checks.tensor("mask", mask, dims=(2,), dtypes=None)
    checks.shape("mask", mask, bt, "(B, T)")
    if ref_logp is not None:
        checks.tensor("ref_logp", ref_logp, dims=(2,))
        checks.shape("ref_logp", ref_logp, bt, "(B, T)")
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


def _token_loss(logp2d, old_logp, advantages, valid, ref_logp, rollout_is_weights, opts: GRPOOptions):
    """Run the Triton token-loss kernel: (dloss/dlogp, row stats); see ``kernels/grpo_loss.py``."""
    from rlvrw.kernels import grpo_loss as kernels

    row_scale = reference.aggregation_row_scale(
        valid, opts.loss_agg, opts.num_tokens, opts.num_seqs, opts.norm_length, logp2d.dtype, opts.dp_size,
        opts.count_empty_seqs,
    )
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return kernels.grpo_token_loss(
        logp2d, old_logp, adv.expand(logp2d.shape), valid, ref_logp, row_scale,
        clip_low=opts.clip_low, clip_high=opts.clip_high, dual_clip=opts.dual_clip, kl_coef=opts.kl_coef,
        kl_type=opts.kl_type, log_ratio_bounds=log_ratio_bounds(opts.log_ratio_clamp),
        sequence_ratio=opts.ratio_level == "sequence", kl_clamp=opts.kl_clamp,
        k3_bounds=k3_exponent_bounds(opts.kl_clamp), rollout_is_weights=rollout_is_weights,
    )


def _loss_from_rows(row_stats: torch.Tensor, kl_coef: float) -> torch.Tensor:
    return row_stats[:, 0].sum() + kl_coef * row_stats[:, 1].sum()


class GRPOLossFunction(torch.autograd.Function):
    """Loss over (B, T) log-probs; the kernel computes d(loss)/d(logp) in the forward, the backward scales it."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, valid, ref_logp, rollout_is_weights, opts):
        dlogp, row_stats = _token_loss(
            logp.to(compute_dtype(logp.dtype)), old_logp, advantages, valid, ref_logp, rollout_is_weights, opts
        )
        ctx.save_for_backward(dlogp)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(row_stats)
        return _loss_from_rows(row_stats, opts.kl_coef), row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_rows):
        (dlogp,) = ctx.saved_tensors
        return (dlogp * grad_loss).to(ctx.logp_dtype), None, None, None, None, None, None


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    rollout_is_weights: torch.Tensor | None = None,
    backend: str | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/PPO clipped-ratio loss with a KL penalty over token log-probs.

    logp, old_logp, mask, ref_logp: (B, T); advantages (B,) or (B, T); mask nonzero marks the tokens that count.
    rollout_is_weights: (B, T) or (B,) per sequence, constants multiplying the policy term (rollout correction:
    VERL's ``rollout_is_weights``, TRL's vLLM importance-sampling ratio; ``rollout_correction_weights`` makes them).
    Returns ``(loss, stats)``; stats are 0-d device tensors (pg_loss, kl, clip_frac, clip_frac_lower, approx_kl),
    made without a host sync. Gradients flow to ``logp`` only. Whatever masked positions hold never reaches the loss
    or the gradient; a NaN at a valid position makes the loss NaN on every backend.

    Options (keyword; the formulas are in ``rlvrw.reference.grpo``, the peers' names at the top of this module):
      clip_low=0.2, clip_high=0.2   ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher: clip_high > clip_low)
      dual_clip=None                c > 1 caps the loss of negative advantages at -A*c (VERL's clip_ratio_c)
      kl_coef=0.0, kl_type="k3"     "k1" "k2" "k3" "abs"; with "+" (e.g. "k3+") the value of k, the gradient of k2
      kl_clamp=10.0                 the k3 estimate is clamped to [-kl_clamp, kl_clamp] (VERL); inf: no clamp (TRL)
      loss_agg="token-mean"         "token-mean" "token-sum" "seq-mean-token-sum" "seq-mean-token-mean"
                                    "seq-mean-token-sum-norm" (VERL's agg_loss)
      num_tokens=None               global token count of token-mean (micro-batches and ranks sum to the big batch)
      num_seqs=None                 global sequence count of the seq-mean modes; default the rows with a valid token
      count_empty_seqs=False        True: the default sequence count is B, fully masked rows included (TRL)
      norm_length=None              the constant of seq-mean-token-sum-norm (Dr. GRPO); default T
      dp_size=1                     data-parallel ranks whose gradients are averaged: the loss is multiplied by it
      log_ratio_clamp=20.0          the log ratio is clamped to [-c, c] (or to (low, high) for a pair) before exp
      ratio_level="token"           "token", or "sequence" (GSPO: the ratio is the geometric mean over the sequence)
    """
    opts = GRPOOptions.from_kwargs("grpo_loss", options)
    checks.tensor("logp", logp, dims=(2,))
    _check_loss_inputs(old_logp, advantages, mask, ref_logp, rollout_is_weights, tuple(logp.shape), opts)
    device = checks.same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                                 rollout_is_weights=rollout_is_weights)
    name = _backend.resolve("grpo_loss", device, backend)
    if name == "reference":
        return reference.grpo_loss(
            logp, old_logp, advantages, mask, ref_logp, rollout_is_weights=rollout_is_weights, **opts.as_kwargs()
        )
    loss, row_stats = GRPOLossFunction.apply(logp, old_logp, advantages, mask != 0, ref_logp, rollout_is_weights, opts)
    return loss, _stats(row_stats)


class GRPOLossFromLogitsFunction(torch.autograd.Function):
    """One pass over the logits forward (log-probs, and entropies when asked), the token-loss kernel, one pass
    backward (d(logits), optionally written over the logits). Nothing (N, V) is allocated besides the logits
    themselves when in place."""

    @staticmethod
    def forward(ctx, logits, tokens1d, old_logp, advantages, valid, ref_logp, rollout_is_weights, inv_temperature,
                opts, with_entropy, inplace, backend):
        passes = logits_passes(backend)
        logp, lse, entropy = passes.logits_forward(logits, tokens1d, inv_temperature, with_entropy)
        dlogp, row_stats = _token_loss(
            logp.view(valid.shape), old_logp, advantages, valid, ref_logp, rollout_is_weights, opts
        )
        if with_entropy:
            entropy = torch.where(valid.reshape(-1), entropy, 0)  # 0 at masked positions, whatever their logits
        else:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, tokens1d, lse, dlogp, entropy, valid)
        ctx.passes, ctx.inv_temperature, ctx.inplace = passes, inv_temperature, inplace
        ctx.mark_non_differentiable(row_stats)
        return _loss_from_rows(row_stats, opts.kl_coef), row_stats, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_rows, grad_entropy):
        logits, tokens1d, lse, dlogp, entropy, valid = ctx.saved_tensors
        if entropy.numel() == 0 or grad_entropy is None:
            entropy = grad_entropy = None
        else:
            grad_entropy = torch.where(valid.reshape(-1), grad_entropy, 0)
        grad_logits = ctx.passes.logits_backward(
            logits, tokens1d, ctx.inv_temperature, lse, (dlogp * grad_loss).reshape(-1), entropy, grad_entropy,
            out=logits if ctx.inplace else None,
        )
        return (grad_logits,) + (None,) * 11


def grpo_loss_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    rollout_is_weights: torch.Tensor | None = None,
    inplace_backward: bool = True,
    backend: str | None = None,
    **options,
):
    """``grpo_loss(token_logprobs(logits, tokens, temperature), ...)``, fused: logits (B, T, V), tokens (B, T).

    Returns ``(loss, stats)``, or ``(loss, stats, entropy)`` with ``return_entropy=True``: the (B, T) entropy of
    ``softmax(logits / temperature)`` from the same pass over the logits (0 at masked positions), differentiable,
    so an entropy bonus costs no second pass. The backward writes d(logits) over the logits
    (``inplace_backward=True``, the default: the logits are consumed, as in Liger's fused losses); pass False when
    the logits are needed afterwards. Token ids at masked positions are ignored (padding such as -100 is fine
    there). ``rollout_is_weights`` and the options as ``grpo_loss``.
    """
    opts = GRPOOptions.from_kwargs("grpo_loss_from_logits", options)
    checks.tensor("logits", logits, dims=(3,))
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a vocabulary (last) dimension of size >= 1, got shape {tuple(logits.shape)}")
    checks.tensor("tokens", tokens, dtypes=checks.INDEX_DTYPES)
    bt = tuple(logits.shape[:2])
    checks.shape("tokens", tokens, bt, "logits.shape[:2]")
    _check_loss_inputs(old_logp, advantages, mask, ref_logp, rollout_is_weights, bt, opts)
    temperature = checks.number("temperature", temperature, low=0, low_open=True)
    return_entropy = checks.boolean("return_entropy", return_entropy)
    inplace_backward = checks.boolean("inplace_backward", inplace_backward)
    device = checks.same_device(
        logits=logits, tokens=tokens, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
        rollout_is_weights=rollout_is_weights,
    )
    valid = mask != 0
    vocab = logits.shape[-1]
    checks.token_ids("tokens", tokens, vocab, valid)
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    tokens1d = tokens.reshape(-1)
    name = resolve_logits_backend("grpo_loss_from_logits", logits, tokens1d, backend)
    if name == "reference":
        return reference.grpo_loss_from_logits(
            logits, tokens, old_logp, advantages, mask, ref_logp, temperature, return_entropy, rollout_is_weights,
            **opts.as_kwargs(),
        )
    loss, row_stats, entropy = GRPOLossFromLogitsFunction.apply(
        logits_rows(logits), tokens1d, old_logp, advantages, valid, ref_logp, rollout_is_weights, 1.0 / temperature,
        opts, return_entropy, inplace_backward, name,
    )
    if return_entropy:
        return loss, _stats(row_stats), entropy.view(bt)
    return loss, _stats(row_stats)


def rollout_correction_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    threshold: float = 2.0,
    threshold_lower: float | None = None,
) -> torch.Tensor:
    """Truncated importance weights pi_old / pi_rollout (rollout correction), (B, T), for
    ``grpo_loss(..., rollout_is_weights=...)``: VERL's ``compute_rollout_correction_weights`` (``rollout_is`` =
    level, ``rollout_is_threshold`` = threshold, or "lower_upper" = (threshold_lower, threshold)), without its batch
    normalisation. ``level``: "token" (one weight per token) or "sequence" (the product over the sequence). Weights
    above ``threshold`` are truncated to it (TIS) or, with ``threshold_lower``, weights outside [threshold_lower,
    threshold] are set to 0 (IcePop). 0 at masked positions; detached. Elementwise torch ops on any device.
    """
    checks.tensor("old_logp", old_logp, dims=(2,))
    checks.tensor("rollout_logp", rollout_logp, dims=(2,))
    checks.shape("rollout_logp", rollout_logp, tuple(old_logp.shape), "old_logp's shape")
    checks.tensor("mask", mask, dims=(2,), dtypes=None)
    checks.shape("mask", mask, tuple(old_logp.shape), "old_logp's shape")
    checks.same_device(old_logp=old_logp, rollout_logp=rollout_logp, mask=mask)
    checks.choice("level", level, ROLLOUT_IS_LEVELS)
    threshold = checks.number("threshold", threshold, low=0, low_open=True)
    if threshold_lower is not None:
        threshold_lower = checks.number("threshold_lower", threshold_lower, low=0, low_open=True, high=threshold)
    return reference.rollout_correction_weights(old_logp, rollout_logp, mask, level, threshold, threshold_lower)


class GRPOLoss(torch.nn.Module):
    """Module form of ``grpo_loss`` (``from_logits=False``) or ``grpo_loss_from_logits``, holding the options."""

    def __init__(self, from_logits: bool = False, temperature: float = 1.0, **options):
        super().__init__()
        self.options = GRPOOptions.from_kwargs("GRPOLoss", options)
        self.from_logits = checks.boolean("from_logits", from_logits)
        self.temperature = checks.number("temperature", temperature, low=0, low_open=True)

    def forward(self, *inputs, ref_logp=None, rollout_is_weights=None, **call_options):
        """``(logp, old_logp, advantages, mask)``, or ``(logits, tokens, old_logp, advantages, mask)`` from logits
        (then ``return_entropy=True`` is accepted too)."""
        kwargs = self.options.as_kwargs()
        if self.from_logits:
            logits, tokens, old_logp, advantages, mask = inputs
            return grpo_loss_from_logits(
                logits, tokens, old_logp, advantages, mask, ref_logp, self.temperature,
                rollout_is_weights=rollout_is_weights, **call_options, **kwargs,
            )
        logp, old_logp, advantages, mask = inputs
        return grpo_loss(logp, old_logp, advantages, mask, ref_logp, rollout_is_weights=rollout_is_weights,
                         **call_options, **kwargs)
