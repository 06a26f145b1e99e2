"""Triton kernels of the pixel terms of the frame reward (``rlvrw.ops.frame_reward``): per predicted frame, the mean
absolute error, the mean squared error and the mean SSIM against its group's ground truth, in one pass. The spec is
``rlvrw.reference.reward`` (``frame_metric_values``).

Layout, as in ``kernels/lpips_tail.py``: predictions (B*G*F, 3, H, W) in (b, g, f) order, ground truths (B*F, 3, H, W)
in (b, f) order; prediction row p is compared with ground-truth row ``(p // (G*F)) * F + p % F``. Any strides.

SSIM needs Gaussian-weighted local moments. The caller makes them with the separable window (two 1-D convolutions):
the ground truth's mean and second moment once per group, ``target_moments`` (B*F, 2, 3, h, w), and each prediction's
mean, second moment and cross moment with its ground truth, ``pred_moments`` (B*G*F, 3, 3, h, w), both contiguous
(h = H - 10, w = W - 10 for the 11-tap window). ``frame_stats_forward`` then reads, per predicted frame, its pixels,
its ground truth's pixels and both moment stacks once, forms the SSIM map in registers and writes the three per-frame
means: nothing of the map's size is written. ``frame_stats_backward`` gives the gradient with respect to the
prediction's pixels (from MAE and MSE) and to its moments (from SSIM; autograd carries it through the convolutions).

Each forward program sums a slice of a frame's elements (``n_split`` programs per frame, partial sums already divided
by the element count; the caller adds them: deterministic, no atomics). Math in float32, float64 for float64 inputs.
Nothing here validates arguments (``rlvrw.ops`` does) or synchronises with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATS = ("mae", "mse", "ssim")  # the columns of the per-frame output


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split(rows: int, blocks_per_row: int, device: torch.device) -> int:
    """Programs per frame: enough to fill a GPU (8 per SM over all frames); one under the CPU interpreter."""
    if device.type != "cuda":
        return 1
    wanted = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks_per_row, triton.cdiv(wanted, max(rows, 1))))


@triton.jit
def _ssim_terms(mu_p, e_pp, e_pt, mu_t, e_tt, c1, c2):
    """The SSIM map's numerator and denominator factors: S = (a1 * a2) / (b1 * b2)."""
    a1 = 2.0 * mu_p * mu_t + c1
    a2 = 2.0 * (e_pt - mu_p * mu_t) + c2
    b1 = mu_p * mu_p + mu_t * mu_t + c1
    b2 = (e_pp - mu_p * mu_p) + (e_tt - mu_t * mu_t) + c2
    return a1, a2, b1, b2


@triton.jit
def _pixel_offsets(i, H, W, s_c, s_h, s_w):
    """Offsets of flat element indices i over (3, H, W) in a frame of strides (s_c, s_h, s_w)."""
    hw = H * W
    c = i // hw
    r = i - c * hw
    y = r // W
    x = r - y * W
    return c * s_c + y * s_h + x * s_w


@triton.jit
def _frame_stats_fwd_kernel(
    pred_ptr, target_ptr, pm_ptr, tm_ptr, out_ptr,
    G, F, H, W, n_win, n_split, inv_pix: tl.float64, inv_win: tl.float64, c1: tl.float64, c2: tl.float64,
    sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w,
    WITH_SSIM: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cdt = out_ptr.dtype.element_ty
    t = (p // (G * F)) * F + p % F
    offs = tl.arange(0, BLOCK)
    n_pix = 3 * H * W
    acc_abs = tl.zeros((BLOCK,), dtype=cdt)
    acc_sq = tl.zeros((BLOCK,), dtype=cdt)
    for start in range(split * BLOCK, n_pix, n_split * BLOCK):
        i = start + offs
        inside = i < n_pix
        a = tl.load(pred_ptr + p * sp_n + _pixel_offsets(i, H, W, sp_c, sp_h, sp_w), mask=inside, other=0.0)
        b = tl.load(target_ptr + t * st_n + _pixel_offsets(i, H, W, st_c, st_h, st_w), mask=inside, other=0.0)
        d = a.to(cdt) - b.to(cdt)
        acc_abs += tl.abs(d)
        acc_sq += d * d
    row = out_ptr + (p * n_split + split) * 3
    tl.store(row, tl.sum(acc_abs, axis=0) * tl.full((), inv_pix, cdt))
    tl.store(row + 1, tl.sum(acc_sq, axis=0) * tl.full((), inv_pix, cdt))
    if WITH_SSIM:
        c1_ = tl.full((), c1, cdt)
        c2_ = tl.full((), c2, cdt)
        acc = tl.zeros((BLOCK,), dtype=cdt)
        pm = pm_ptr + p * 3 * n_win
        tm = tm_ptr + t * 2 * n_win
        for start in range(split * BLOCK, n_win, n_split * BLOCK):
            i = start + offs
            inside = i < n_win
            mu_p = tl.load(pm + i, mask=inside, other=0.0).to(cdt)
            e_pp = tl.load(pm + n_win + i, mask=inside, other=0.0).to(cdt)
            e_pt = tl.load(pm + 2 * n_win + i, mask=inside, other=0.0).to(cdt)
            mu_t = tl.load(tm + i, mask=inside, other=0.0).to(cdt)
            e_tt = tl.load(tm + n_win + i, mask=inside, other=0.0).to(cdt)
            a1, a2, b1, b2 = _ssim_terms(mu_p, e_pp, e_pt, mu_t, e_tt, c1_, c2_)
            acc += tl.where(inside, (a1 * a2) / (b1 * b2), 0.0)
        tl.store(row + 2, tl.sum(acc, axis=0) * tl.full((), inv_win, cdt))


@triton.jit
def _frame_stats_bwd_kernel(
    pred_ptr, target_ptr, pm_ptr, tm_ptr, grad_ptr, grad_pred_ptr, grad_pm_ptr,
    G, F, H, W, n_win, inv_pix: tl.float64, inv_win: tl.float64, c1: tl.float64, c2: tl.float64,
    sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w,
    WITH_SSIM: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cdt = grad_ptr.dtype.element_ty
    t = (p // (G * F)) * F + p % F
    i = block * BLOCK + tl.arange(0, BLOCK)
    n_pix = 3 * H * W
    g_abs = tl.load(grad_ptr + p * 3) * tl.full((), inv_pix, cdt)
    g_sq = tl.load(grad_ptr + p * 3 + 1) * tl.full((), inv_pix, cdt)
    if block * BLOCK < n_pix:
        inside = i < n_pix
        a = tl.load(pred_ptr + p * sp_n + _pixel_offsets(i, H, W, sp_c, sp_h, sp_w), mask=inside, other=0.0)
        b = tl.load(target_ptr + t * st_n + _pixel_offsets(i, H, W, st_c, st_h, st_w), mask=inside, other=0.0)
        d = a.to(cdt) - b.to(cdt)
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, tl.where(d == d, 0.0, d)))  # NaN stays NaN
        grad = g_abs * sign + (2.0 * g_sq) * d
        tl.store(grad_pred_ptr + p * n_pix + i, grad.to(grad_pred_ptr.dtype.element_ty), mask=inside)
    if WITH_SSIM:
        if block * BLOCK < n_win:
            inside = i < n_win
            c1_ = tl.full((), c1, cdt)
            c2_ = tl.full((), c2, cdt)
            g = tl.load(grad_ptr + p * 3 + 2) * tl.full((), inv_win, cdt)
            pm = pm_ptr + p * 3 * n_win
            tm = tm_ptr + t * 2 * n_win
            mu_p = tl.load(pm + i, mask=inside, other=0.0).to(cdt)
            e_pp = tl.load(pm + n_win + i, mask=inside, other=0.0).to(cdt)
            e_pt = tl.load(pm + 2 * n_win + i, mask=inside, other=0.0).to(cdt)
            mu_t = tl.load(tm + i, mask=inside, other=0.0).to(cdt)
            e_tt = tl.load(tm + n_win + i, mask=inside, other=0.0).to(cdt)
            a1, a2, b1, b2 = _ssim_terms(mu_p, e_pp, e_pt, mu_t, e_tt, c1_, c2_)
            den = b1 * b2
            s = (a1 * a2) / den
            # S = a1 a2 / (b1 b2) with a1(mu_p), a2(mu_p, e_pt), b1(mu_p), b2(mu_p, e_pp)
            d_e_pt = 2.0 * a1 / den
            d_e_pp = -s / b2
            d_mu_p = 2.0 * mu_t * (a2 - a1) / den - 2.0 * mu_p * s * (1.0 / b1 - 1.0 / b2)
            out = grad_pm_ptr + p * 3 * n_win
            odt = grad_pm_ptr.dtype.element_ty
            tl.store(out + i, (g * d_mu_p).to(odt), mask=inside)
            tl.store(out + n_win + i, (g * d_e_pp).to(odt), mask=inside)
            tl.store(out + 2 * n_win + i, (g * d_e_pt).to(odt), mask=inside)


def _window_count(pred_moments: torch.Tensor | None) -> int:
    return 0 if pred_moments is None else pred_moments[0, 0].numel()


def frame_stats_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    pred_moments: torch.Tensor | None,
    target_moments: torch.Tensor | None,
    group_size: int,
    num_frames: int,
    ssim_c: tuple[float, float] = (0.0, 0.0),
    *,
    n_split: int | None = None,
    out: torch.Tensor | None = None,
    block: int = 1024,
) -> torch.Tensor:
    """pred (B*G*F, 3, H, W), target (B*F, 3, H, W), the moment stacks (module doc; None: no SSIM) and SSIM's
    stabilizing constants (c1, c2) = ((K1 L)^2, (K2 L)^2) -> partials (B*G*F, n_split, 3) summing to (MAE, MSE,
    SSIM) per predicted frame (the SSIM column 0 without SSIM)."""
    n_pred, _, h, w = pred.shape
    acc_dtype = _compute_dtype(pred.dtype)
    with_ssim = pred_moments is not None
    n_win = _window_count(pred_moments)
    if n_split is None:
        n_split = _split(n_pred, triton.cdiv(3 * h * w, block), pred.device)
    if out is None:
        out = torch.empty((n_pred, n_split, 3), dtype=acc_dtype, device=pred.device)
    if not with_ssim:
        out[:, :, 2] = 0
    c1, c2 = ssim_c
    if n_pred:
        _frame_stats_fwd_kernel[(n_pred, n_split)](
            pred, target, pred_moments if with_ssim else pred, target_moments if with_ssim else target, out,
            group_size, num_frames, h, w, n_win, n_split, 1.0 / (3 * h * w), 1.0 / max(n_win, 1), c1, c2,
            *pred.stride(), *target.stride(),
            WITH_SSIM=with_ssim, BLOCK=block,
        )
    return out


def frame_stats_backward(
    pred: torch.Tensor,
    target: torch.Tensor,
    pred_moments: torch.Tensor | None,
    target_moments: torch.Tensor | None,
    grad_stats: torch.Tensor,
    group_size: int,
    num_frames: int,
    ssim_c: tuple[float, float] = (0.0, 0.0),
    *,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d(sum grad_stats * stats) / d(pred) (contiguous, pred's dtype) and / d(pred_moments) (None without SSIM);
    grad_stats (B*G*F, 3)."""
    n_pred, _, h, w = pred.shape
    acc_dtype = _compute_dtype(pred.dtype)
    with_ssim = pred_moments is not None
    n_win = _window_count(pred_moments)
    grad_stats = grad_stats.to(acc_dtype).contiguous()
    grad_pred = torch.empty((n_pred, 3, h, w), dtype=pred.dtype, device=pred.device)
    grad_moments = torch.empty_like(pred_moments) if with_ssim else None
    c1, c2 = ssim_c
    if n_pred:
        blocks = triton.cdiv(max(3 * h * w, n_win), block)
        _frame_stats_bwd_kernel[(n_pred, blocks)](
            pred, target, pred_moments if with_ssim else pred, target_moments if with_ssim else target, grad_stats,
            grad_pred, grad_moments if with_ssim else grad_pred,
            group_size, num_frames, h, w, n_win, 1.0 / (3 * h * w), 1.0 / max(n_win, 1), c1, c2,
            *pred.stride(), *target.stride(),
            WITH_SSIM=with_ssim, BLOCK=block,
        )
    return grad_pred, grad_moments
