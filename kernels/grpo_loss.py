"""Triton kernels for GRPO: the per-token clipped policy loss with a KL penalty, and group-relative advantages.

The executable spec is ``rlvrw.reference.grpo`` (``grpo_token_terms``, ``grpo_loss``, ``kl_estimate``,
``group_advantages``); these kernels reproduce its values and torch autograd's gradients of it, including autograd's
conventions at kinks: ``clamp`` passes the gradient on the closed interval ``[min, max]``, ``abs`` has gradient 0 at
0, and ``maximum`` / ``minimum`` split the gradient 0.5 / 0.5 between tied operands.

Launchers:

* ``grpo_token_loss(logp, old_logp, advantages, valid, ref_logp, row_scale, *, ...) -> (dlogp, row_stats)``: one
  fused pass per row (two for the sequence-level ratio) giving the gradient of the aggregated loss with respect to
  ``logp`` and per-row sums from which the caller forms the loss and its statistics.
* ``group_advantages(rewards, group_size, eps, scale)`` and ``group_advantages_backward(grad_adv, rewards, ...)``.

Nothing here validates arguments (``rlvrw.ops`` does) and nothing synchronises with the host. Floating-point
constants (clip bounds, clamps, coefficients) are passed as 64-bit scalars and rounded to the compute dtype inside
the kernel, so float64 inputs get float64-exact constants, as in the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# kl_type -> the KL_TYPE constexpr of the kernel ("k2+" is k2: its straight-through gradient is its own)
_KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3, "k1+": 4, "k3+": 5, "abs+": 6, "k2+": 1}
_NUM_ROW_STATS = 6


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_loadable(t: torch.Tensor) -> torch.Tensor:
    # bool tensors are read as bytes (same size, same strides, no copy)
    return t.view(torch.uint8) if t.dtype == torch.bool else t


# ---------------------------------------------------------------------------------------------------------------------
# GRPO token loss
# ---------------------------------------------------------------------------------------------------------------------


# NaN stays NaN, as in torch.clamp / maximum / minimum (tl.minimum and tl.maximum may return the other operand); a
# select on x != x rather than Triton's NaN-propagating min/max, which lower to instructions not every GPU has in fp64
@triton.jit
def _clamp(x, lo, hi):
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def _maximum(a, b):
    return tl.where(a != a, a, tl.where(b != b, b, tl.maximum(a, b)))


@triton.jit
def _minimum(a, b):
    return tl.where(a != a, a, tl.where(b != b, b, tl.minimum(a, b)))


@triton.jit
def _grpo_token_loss_kernel(
    lp_ptr, old_ptr, adv_ptr, valid_ptr, ref_ptr, w_ptr, scale_ptr, dlp_ptr, stats_ptr,
    B, T,
    stride_lp_b, stride_lp_t, stride_old_b, stride_old_t, stride_adv_b, stride_adv_t, stride_valid_b, stride_valid_t,
    stride_ref_b, stride_ref_t, stride_w_b, stride_w_t, stride_scale, stride_dlp_b, stride_dlp_t,
    ratio_lo_arg: tl.float64, ratio_hi_arg: tl.float64, lr_lo_arg: tl.float64, lr_hi_arg: tl.float64,
    dual_arg: tl.float64, kl_coef_arg: tl.float64, k3_lo_arg: tl.float64, k3_hi_arg: tl.float64,
    kl_clamp_arg: tl.float64,
    HAS_REF: tl.constexpr, KL_GRAD: tl.constexpr, KL_TYPE: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, SEQ_RATIO: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_T)
    cdt = dlp_ptr.dtype.element_ty  # compute dtype: float32 or float64

    zero = tl.zeros((BLOCK_B, BLOCK_T), dtype=cdt)
    one = zero + 1.0
    lr_lo = tl.full((), lr_lo_arg, cdt)
    lr_hi = tl.full((), lr_hi_arg, cdt)
    ratio_lo = tl.full((), ratio_lo_arg, cdt)
    ratio_hi = tl.full((), ratio_hi_arg, cdt)
    dual = tl.full((), dual_arg, cdt)
    kl_coef = tl.full((), kl_coef_arg, cdt)
    k3_lo = tl.full((), k3_lo_arg, cdt)
    k3_hi = tl.full((), k3_hi_arg, cdt)
    kl_cap = tl.full((), kl_clamp_arg, cdt)

    lp_row = lp_ptr + rows64[:, None] * stride_lp_b
    old_row = old_ptr + rows64[:, None] * stride_old_b
    adv_row = adv_ptr + rows64[:, None] * stride_adv_b
    valid_row = valid_ptr + rows64[:, None] * stride_valid_b
    ref_row = ref_ptr + rows64[:, None] * stride_ref_b
    w_row = w_ptr + rows64[:, None] * stride_w_b
    dlp_row = dlp_ptr + rows64[:, None] * stride_dlp_b

    row_scale = tl.load(scale_ptr + rows64 * stride_scale, mask=row_ok, other=0.0).to(cdt)

    if SEQ_RATIO:
        # GSPO: the ratio of the whole sequence, exp(clamp(mean_t(lp - old))), needs a first pass over the row
        acc_lr = zero
        acc_n = zero
        for t0 in range(0, T, BLOCK_T):
            t = t0 + cols
            inb = row_ok[:, None] & (t < T)[None, :]
            valid = inb & (tl.load(valid_row + t[None, :] * stride_valid_t, mask=inb, other=0) != 0)
            lp = tl.load(lp_row + t[None, :] * stride_lp_t, mask=valid, other=0.0).to(cdt)
            old = tl.load(old_row + t[None, :] * stride_old_t, mask=valid, other=0.0).to(cdt)
            acc_lr += lp - old
            acc_n += tl.where(valid, one, zero)
        seq_lr = tl.sum(acc_lr, axis=1) / tl.maximum(tl.sum(acc_n, axis=1), 1.0)
        seq_in = (seq_lr >= lr_lo) & (seq_lr <= lr_hi)
        seq_ratio = tl.exp(_clamp(seq_lr, lr_lo, lr_hi))
        seq_dratio = tl.where(seq_in, seq_ratio, 0.0)

    acc_pg = zero
    acc_kl = zero
    acc_clip = zero
    acc_dual = zero
    acc_nlr = zero
    acc_n = zero
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        inb = row_ok[:, None] & (t < T)[None, :]
        valid = inb & (tl.load(valid_row + t[None, :] * stride_valid_t, mask=inb, other=0) != 0)
        # masked positions read as 0 and are never touched, so garbage there cannot leak
        lp = tl.load(lp_row + t[None, :] * stride_lp_t, mask=valid, other=0.0).to(cdt)
        old = tl.load(old_row + t[None, :] * stride_old_t, mask=valid, other=0.0).to(cdt)
        adv = tl.load(adv_row + t[None, :] * stride_adv_t, mask=valid, other=0.0).to(cdt)

        log_ratio = lp - old
        lr_clamped = _clamp(log_ratio, lr_lo, lr_hi)
        if SEQ_RATIO:
            ratio = zero + seq_ratio[:, None]
            dratio = zero + seq_dratio[:, None]  # d ratio / d lp_t
        else:
            ratio = tl.exp(lr_clamped)
            dratio = tl.where((log_ratio >= lr_lo) & (log_ratio <= lr_hi), ratio, zero)

        neg_adv = -adv
        ratio_clipped = _clamp(ratio, ratio_lo, ratio_hi)
        loss_unclipped = neg_adv * ratio
        loss_clipped = neg_adv * ratio_clipped
        pg = _maximum(loss_unclipped, loss_clipped)
        # torch.maximum's gradient: all to the larger operand, half to each on a tie
        w_unclipped = tl.where(loss_unclipped > loss_clipped, one, tl.where(loss_unclipped < loss_clipped, zero, 0.5))
        w_clipped = one - w_unclipped
        in_clip = (ratio >= ratio_lo) & (ratio <= ratio_hi)
        g_ratio = w_unclipped * neg_adv + tl.where(in_clip, w_clipped * neg_adv, zero)
        clipped = valid & (loss_clipped > loss_unclipped)
        if HAS_DUAL:
            cap = neg_adv * dual
            negative = adv < 0
            dual_clipped = valid & negative & (pg > cap)
            # torch.minimum(pg, cap) with cap constant in lp
            w_pg = tl.where(pg < cap, one, tl.where(pg > cap, zero, 0.5))
            g_ratio = tl.where(negative, g_ratio * w_pg, g_ratio)
            pg = tl.where(negative, _minimum(pg, cap), pg)
            acc_dual += tl.where(dual_clipped, one, zero)
        if HAS_WEIGHTS:
            # rollout correction: constant weights on the policy term only
            w = tl.load(w_row + t[None, :] * stride_w_t, mask=valid, other=0.0).to(cdt)
            pg = pg * w
            g_ratio = g_ratio * w
        weight = tl.where(valid, zero + row_scale[:, None], zero)
        grad = weight * g_ratio * dratio

        if HAS_REF:
            ref = tl.load(ref_row + t[None, :] * stride_ref_t, mask=valid, other=0.0).to(cdt)
            d = lp - ref
            if KL_TYPE == 0 or KL_TYPE == 4:  # k1, k1+
                kl = d
            elif KL_TYPE == 1:  # k2 (k2+ is the same)
                kl = 0.5 * (d * d)
            elif KL_TYPE == 3 or KL_TYPE == 6:  # abs, abs+
                kl = tl.abs(d)
            else:  # k3, k3+
                x = _clamp(-d, k3_lo, k3_hi)
                e = tl.exp(x)
                raw = e - x - 1.0
                kl = _clamp(raw, -kl_cap, kl_cap)
                # autograd's clamp passes the gradient on the closed interval (so not at NaN)
                x_in = (-d >= k3_lo) & (-d <= k3_hi)
                k3_grad = tl.where(x_in & (raw >= -kl_cap) & (raw <= kl_cap), 1.0 - e, zero)
            acc_kl += tl.where(valid, kl, zero)
            if KL_GRAD:
                if KL_TYPE == 0:
                    g_kl = one
                elif KL_TYPE == 2:
                    g_kl = k3_grad
                elif KL_TYPE == 3:
                    g_kl = tl.where(d > 0, one, tl.where(d < 0, -one, zero))
                else:  # k2 and the straight-through k1+ / k3+ / abs+: the gradient of d^2 / 2
                    g_kl = d
                grad += (kl_coef * weight) * g_kl

        tl.store(dlp_row + t[None, :] * stride_dlp_t, tl.where(valid, grad, zero), mask=inb)
        acc_pg += tl.where(valid, pg, zero)
        acc_clip += tl.where(clipped, one, zero)
        acc_nlr -= tl.where(valid, lr_clamped, zero)
        acc_n += tl.where(valid, one, zero)

    stats_row = stats_ptr + rows64 * NUM_STATS
    tl.store(stats_row + 0, row_scale * tl.sum(acc_pg, axis=1), mask=row_ok)
    tl.store(stats_row + 1, row_scale * tl.sum(acc_kl, axis=1), mask=row_ok)
    tl.store(stats_row + 2, tl.sum(acc_clip, axis=1), mask=row_ok)
    tl.store(stats_row + 3, tl.sum(acc_dual, axis=1), mask=row_ok)
    tl.store(stats_row + 4, tl.sum(acc_nlr, axis=1), mask=row_ok)
    tl.store(stats_row + 5, tl.sum(acc_n, axis=1), mask=row_ok)


def _token_loss_config(B: int, T: int, element_size: int = 4) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_T, num_warps): a row is walked in tiles of up to 1024 tokens (512 in float64, to stay clear
    of register spills); short rows are packed several to a program, but only while there are enough rows to keep a
    few hundred programs in flight. About 4 elements per thread."""
    max_tile = 1024 if element_size <= 4 else 512
    block_t = max(16, min(triton.next_power_of_2(max(T, 1)), max_tile))
    rows_wanted = max(1, max_tile // block_t)
    rows_spare = max(1, B // 256)
    block_b = min(rows_wanted, 1 << (rows_spare.bit_length() - 1))
    num_warps = max(1, min(8, block_b * block_t // 128))
    return block_b, block_t, num_warps


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    ref_logp: torch.Tensor | None,
    row_scale: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_type: str,
    log_ratio_bounds: tuple[float, float],
    sequence_ratio: bool,
    kl_clamp: float = 10.0,
    k3_bounds: tuple[float, float] = (-math.inf, math.inf),
    rollout_is_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    _config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the aggregated GRPO loss with respect to ``logp`` and per-row sums, in one fused pass.

    logp (B, T) float32/float64 sets the compute dtype; old_logp, ref_logp (B, T) (ref_logp may be None) and
    advantages in any float dtype; advantages (B, T) may be an expanded view of per-sequence values (stride 0 along
    T) and a (B,) tensor is taken as per-sequence; valid (B, T), bool or any dtype (nonzero = valid); row_scale (B,)
    the per-row aggregation weight (``aggregation_row_scale``); rollout_is_weights (B, T), (B,) per sequence, or None,
    multiply the policy term. All strides are arbitrary (a unit token stride is specialised by Triton, so contiguous
    rows cost nothing extra). ``log_ratio_bounds`` clamp the policy log ratio; the k3 estimate clamps its exponent
    -d to ``k3_bounds`` and its value to [-kl_clamp, kl_clamp] (``rlvrw.reference.grpo.k3_exponent_bounds``). NaN
    at a valid position propagates as in the reference.

    Returns ``dlogp`` (B, T) in the compute dtype (written into ``out`` when given: (B, T), compute dtype, any
    strides), exactly 0 where not valid, and ``row_stats`` (B, 6) in the compute dtype, per row:
    ``[sum valid*row_scale*pg, sum valid*row_scale*kl (0 without ref_logp), #clipped, #dual-clipped,
    sum over valid of -clamp(logp - old_logp), #valid]``. The loss is ``sum(row_stats[:, 0] + kl_coef *
    row_stats[:, 1])``. The KL gradient is included only when ``ref_logp`` is given and ``kl_coef != 0``.
    ``_config`` overrides the (BLOCK_B, BLOCK_T, num_warps) heuristic (for tests).
    """
    B, T = logp.shape
    cdt = logp.dtype
    if out is None:
        out = torch.empty((B, T), dtype=cdt, device=logp.device)
    row_stats = torch.empty((B, _NUM_ROW_STATS), dtype=cdt, device=logp.device)
    if B == 0:
        return out, row_stats
    if advantages.dim() == 1:
        stride_adv_b, stride_adv_t = advantages.stride(0), 0
    else:
        stride_adv_b, stride_adv_t = advantages.stride()
    valid = _as_loadable(valid)
    has_ref = ref_logp is not None
    ref = ref_logp if has_ref else logp  # a placeholder pointer, never read
    has_weights = rollout_is_weights is not None
    weights = rollout_is_weights if has_weights else logp  # a placeholder pointer, never read
    if weights.dim() == 1:
        stride_w_b, stride_w_t = weights.stride(0), 0
    else:
        stride_w_b, stride_w_t = weights.stride()
    block_b, block_t, num_warps = _config or _token_loss_config(B, T, logp.element_size())
    grid = (triton.cdiv(B, block_b),)
    _grpo_token_loss_kernel[grid](
        logp, old_logp, advantages, valid, ref, weights, row_scale, out, row_stats,
        B, T,
        *logp.stride(), *old_logp.stride(), stride_adv_b, stride_adv_t, *valid.stride(), *ref.stride(),
        stride_w_b, stride_w_t, row_scale.stride(0), *out.stride(),
        1.0 - float(clip_low), 1.0 + float(clip_high), float(log_ratio_bounds[0]), float(log_ratio_bounds[1]),
        float(dual_clip) if dual_clip is not None else 0.0, float(kl_coef),
        float(k3_bounds[0]), float(k3_bounds[1]), float(kl_clamp),
        HAS_REF=has_ref, KL_GRAD=has_ref and kl_coef != 0, KL_TYPE=_KL_CODES[kl_type],
        HAS_DUAL=dual_clip is not None, HAS_WEIGHTS=has_weights, SEQ_RATIO=bool(sequence_ratio),
        NUM_STATS=_NUM_ROW_STATS, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
    )
    return out, row_stats


# ---------------------------------------------------------------------------------------------------------------------
# Group advantages
# ---------------------------------------------------------------------------------------------------------------------

# SCALE constexpr
_SCALE_CODES = {"none": 0, "group": 1, "batch": 2}


@triton.jit
def _group_std(centered, G):
    """Unbiased std of each row of ``centered`` (zeros in padding lanes); 0 where the spread is 0 or G == 1."""
    var = tl.sum(centered * centered, axis=1) / tl.maximum(G - 1, 1).to(centered.dtype)
    std = tl.where(var > 0, tl.sqrt(tl.where(var > 0, var, 1.0)), 0.0)
    return var, std


@triton.jit
def _group_centered(r, inb, G):
    """``r - mean_g(r)`` per row (0 in padding lanes), exactly 0 in a row whose rewards are all equal (the mean of
    equal floats can round away from them); NaN stays NaN, as in the reference."""
    mean = tl.sum(r, axis=1) / G.to(r.dtype)
    centered = tl.where(inb, r - mean[:, None], 0.0)
    tied = tl.max(tl.where(inb, r, -float("inf")), axis=1) == tl.min(tl.where(inb, r, float("inf")), axis=1)
    return tl.where(tied[:, None], centered - centered, centered)


@triton.jit(do_not_specialize=["G"])
def _group_advantages_kernel(
    r_ptr, adv_ptr, batch_ptr, n_groups, G, eps_arg: tl.float64,
    SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_G)
    cdt = adv_ptr.dtype.element_ty
    inb = (groups < n_groups)[:, None] & (cols < G)[None, :]
    offs = groups.to(tl.int64)[:, None] * G + cols[None, :]
    r = tl.load(r_ptr + offs, mask=inb, other=0.0).to(cdt)
    centered = _group_centered(r, inb, G)
    if SCALE == 0:
        adv = centered
    else:
        eps = tl.full((), eps_arg, cdt)
        if SCALE == 1:
            var, std = _group_std(centered, G)
            denom = std + eps
        else:
            denom = tl.load(batch_ptr).to(cdt) + tl.zeros((BLOCK_N,), dtype=cdt)  # std of the batch + eps
        # a zero denominator (equal rewards with eps = 0) gives advantage 0
        adv = tl.where(denom[:, None] > 0, centered / tl.where(denom > 0, denom, 1.0)[:, None], 0.0)
    tl.store(adv_ptr + offs, adv, mask=inb)


@triton.jit(do_not_specialize=["G"])
def _group_advantages_backward_kernel(
    g_ptr, r_ptr, dr_ptr, batch_ptr, n_groups, G, stride_g, eps_arg: tl.float64,
    SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_G)
    cdt = batch_ptr.dtype.element_ty
    inb = (groups < n_groups)[:, None] & (cols < G)[None, :]
    idx = groups.to(tl.int64)[:, None] * G + cols[None, :]
    r = tl.load(r_ptr + idx, mask=inb, other=0.0).to(cdt)
    g = tl.load(g_ptr + idx * stride_g, mask=inb, other=0.0).to(cdt)
    Gf = G.to(cdt)
    if SCALE == 0:
        g_centered = g
    elif SCALE == 1:
        eps = tl.full((), eps_arg, cdt)
        centered = _group_centered(r, inb, G)
        var, std = _group_std(centered, G)
        denom = std + eps
        safe = tl.where(denom > 0, denom, 1.0)
        # adv = c / (s + eps), s = sqrt(sum c^2 / (G - 1)); s is a constant where the spread is 0, and the
        # advantage a constant 0 where s + eps is 0
        g_denom = -tl.sum(g * centered, axis=1) / (safe * safe)
        g_var = tl.where(var > 0, g_denom / (2.0 * tl.where(var > 0, std, 1.0)), 0.0)
        g_sq = g_var / tl.maximum(G - 1, 1).to(cdt)
        g_centered = tl.where(denom[:, None] > 0, g / safe[:, None] + (2.0 * g_sq)[:, None] * centered, 0.0)
    else:
        # batch_ptr: [std + eps, mean of all rewards, coefficient of (r - mean) from the batch std, its batch mean]
        denom = tl.load(batch_ptr)
        g_centered = tl.where(denom > 0, g / tl.where(denom > 0, denom, 1.0), 0.0)
    g_centered = tl.where(inb, g_centered, 0.0)
    # backward of the centering r - mean_g(r)
    dr = g_centered - (tl.sum(g_centered, axis=1) / Gf)[:, None]
    if SCALE == 2:
        batch_mean = tl.load(batch_ptr + 1)
        coef = tl.load(batch_ptr + 2)
        shift = tl.load(batch_ptr + 3)
        dr += coef * (r - batch_mean) - shift
    tl.store(dr_ptr + idx, dr, mask=inb)


def _group_config(n_groups: int, G: int) -> tuple[int, int, int]:
    block_g = triton.next_power_of_2(max(G, 1))
    block_n = min(max(1, 1024 // block_g), triton.next_power_of_2(max(n_groups, 1)))
    num_warps = max(1, min(8, block_n * block_g // 128))
    return block_n, block_g, num_warps


def _batch_std_plus_eps(rf: torch.Tensor, eps: float):
    """(var, std, std + eps) of all rewards, unbiased, std 0 at zero spread; device tensors, no host sync."""
    n = rf.numel()
    mean = rf.mean()
    var = (rf - mean).square().sum() / max(n - 1, 1)
    std = torch.where(var > 0, torch.where(var > 0, var, 1).sqrt(), 0)
    return mean, var, std, std + eps


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float, scale: str) -> torch.Tensor:
    """``(r - mean_g) / (std + eps)`` per group of ``group_size`` consecutive rewards (see the reference).

    rewards (B*G,) contiguous, any float dtype; returns (B*G,) float32 (float64 for float64 rewards). ``scale`` is
    "group" (unbiased std of the group; 0 for a group of one or zero spread), "batch" (unbiased std of all rewards,
    computed on the device with torch ops) or "none".
    """
    cdt = _compute_dtype(rewards.dtype)
    n = rewards.numel()
    adv = torch.empty(n, dtype=cdt, device=rewards.device)
    if n == 0:
        return adv
    n_groups = n // group_size
    if scale == "batch":
        batch = _batch_std_plus_eps(rewards.to(cdt), eps)[3].reshape(1)
    else:
        batch = adv  # placeholder, never read
    block_n, block_g, num_warps = _group_config(n_groups, group_size)
    _group_advantages_kernel[(triton.cdiv(n_groups, block_n),)](
        rewards, adv, batch, n_groups, group_size, float(eps),
        SCALE=_SCALE_CODES[scale], BLOCK_N=block_n, BLOCK_G=block_g, num_warps=num_warps,
    )
    return adv


def group_advantages_backward(
    grad_adv: torch.Tensor, rewards: torch.Tensor, group_size: int, eps: float, scale: str
) -> torch.Tensor:
    """Gradient of ``sum(grad_adv * group_advantages(rewards, ...))`` with respect to ``rewards``, in rewards' dtype.

    With ``c = r - mean_g(r)``, ``D = s + eps`` and ``adv = c / D``: ``dc = g / D + (dL/ds) ds/dc`` where
    ``dL/ds = -sum(g c) / D^2`` (summed over the group, or over the batch for ``"batch"``) and
    ``ds/dc = c / ((n - 1) s)`` (zero where the spread is 0, as the reference's std is a constant there); then the
    centering's backward ``dr = dc - mean_g(dc)``. For ``"batch"`` the std's term is ``coef * (r - mean(r))``, minus
    its mean over the batch, with ``coef`` formed by a few torch ops on the device.
    """
    cdt = _compute_dtype(rewards.dtype)
    n = rewards.numel()
    grad = torch.empty(n, dtype=rewards.dtype, device=rewards.device)
    if n == 0:
        return grad
    n_groups = n // group_size
    if scale == "batch":
        rf = rewards.to(cdt)
        mean, var, std, denom = _batch_std_plus_eps(rf, eps)
        g = grad_adv.to(cdt)
        grouped = rf.view(n_groups, group_size)
        centered = grouped - grouped.mean(dim=1, keepdim=True)
        tied = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
        centered = torch.where(tied, centered - centered, centered).reshape(-1)  # as _group_centered
        safe = torch.where(denom > 0, denom, 1)
        g_denom = -(g * centered).sum() / (safe * safe)
        g_var = torch.where(var > 0, g_denom / (2 * torch.where(var > 0, std, 1)), 0)
        coef = 2 * g_var / max(n - 1, 1)
        shift = (coef * (rf - mean)).mean()
        batch = torch.stack([denom, mean, coef, shift]).to(cdt)
    else:
        batch = torch.empty(1, dtype=cdt, device=rewards.device)  # carries the compute dtype; read only by "batch"
    block_n, block_g, num_warps = _group_config(n_groups, group_size)
    _group_advantages_backward_kernel[(triton.cdiv(n_groups, block_n),)](
        grad_adv, rewards, grad, batch, n_groups, group_size, grad_adv.stride(0), float(eps),
        SCALE=_SCALE_CODES[scale], BLOCK_N=block_n, BLOCK_G=block_g, num_warps=num_warps,
    )
    return grad
