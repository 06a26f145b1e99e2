"""The pixel terms of ``rlvrw.ops.frame_reward``: MAE, MSE and SSIM of every predicted frame against its group's
ground truth, differentiable in the prediction (``pixel_stats``).

SSIM's local moments come from the separable Gaussian window (``reference.gaussian_filter``: a 1-D pass along rows,
then one along columns), the ground truth's mean and second moment once per group, each prediction's mean, second
moment and cross moment with its ground truth. On ``triton`` one kernel (``kernels/frame_stats.py``) then reads each
prediction's pixels, its ground truth's and both moment stacks once and writes the three per-frame means; its backward
kernel gives the gradient to the pixels and to the moments, and autograd carries the latter through the convolutions.
On ``reference`` the same steps run in plain PyTorch, the ground truth broadcast over its group (never repeated).
Whole groups are processed in chunks that keep the moment stacks near 1/16 of the GPU's memory (256 MiB on CPU).
"""

from __future__ import annotations

import torch

from rlvrw.reference import reward as reference

PIXEL_STATS = ("mae", "mse", "ssim")  # the columns of pixel_stats' result
_MOMENT_BYTES_PER_PIXEL = 4 * 4 * 9  # fp32 prediction moments: the stack of 9 maps, its two filtered copies, headroom


def _kernels():
    from rlvrw.kernels import frame_stats

    return frame_stats


def _ssim_constants() -> tuple[float, float]:
    return (reference.SSIM_K1) ** 2, (reference.SSIM_K2) ** 2


class _FrameStatsFunction(torch.autograd.Function):
    """The fused kernel: (MAE, MSE, SSIM) per predicted frame; gradients reach the prediction and its moments."""

    @staticmethod
    def forward(ctx, pred, target, pred_moments, target_moments, group_size, num_frames):
        partials = _kernels().frame_stats_forward(pred, target, pred_moments, target_moments, group_size, num_frames,
                                                  _ssim_constants())
        ctx.save_for_backward(pred, target, pred_moments, target_moments)
        ctx.layout = (group_size, num_frames)
        return partials.sum(dim=1)

    @staticmethod
    def backward(ctx, grad_stats):
        pred, target, pred_moments, target_moments = ctx.saved_tensors
        grad_pred, grad_moments = _kernels().frame_stats_backward(
            pred, target, pred_moments, target_moments, grad_stats, *ctx.layout, _ssim_constants()
        )
        return grad_pred, None, grad_moments, None, None, None


def ssim_moments(pred: torch.Tensor, target: torch.Tensor, group_size: int, num_frames: int):
    """(pred moments (B*G*F, 3, 3, h, w): mean, second moment, cross moment with the ground truth; target moments
    (B*F, 2, 3, h, w): mean, second moment), contiguous, in the frames' dtype."""
    t = target.unflatten(0, (-1, 1, num_frames))
    p = pred.unflatten(0, (-1, group_size, num_frames))
    pred_maps = torch.stack([p, p * p, p * t], dim=3).flatten(0, 2)
    target_maps = torch.stack([target, target * target], dim=1)
    return reference.gaussian_filter(pred_maps).contiguous(), reference.gaussian_filter(target_maps).contiguous()


def _stats_reference(pred, target, pred_moments, target_moments, group_size, num_frames) -> torch.Tensor:
    p = pred.unflatten(0, (-1, group_size, num_frames))
    diff = (p - target.unflatten(0, (-1, 1, num_frames))).flatten(0, 2)
    stats = [diff.abs().mean(dim=(1, 2, 3)), diff.square().mean(dim=(1, 2, 3))]
    if pred_moments is None:
        stats.append(torch.zeros_like(stats[0]))
    else:
        mu_p, e_pp, e_pt = pred_moments.unflatten(0, (-1, group_size, num_frames)).unbind(dim=3)
        mu_t, e_tt = target_moments.unflatten(0, (-1, 1, num_frames)).unbind(dim=3)
        stats.append(reference.ssim_map(mu_p, mu_t, e_pp, e_tt, e_pt).flatten(3).mean(dim=3).flatten(0, 2))
    return torch.stack(stats, dim=1)


def _groups_per_chunk(pred: torch.Tensor, group_size: int, num_frames: int) -> int:
    device = pred.device
    budget = torch.cuda.get_device_properties(device).total_memory // 16 if device.type == "cuda" else 1 << 28
    per_group = group_size * num_frames * pred.shape[-1] * pred.shape[-2] * _MOMENT_BYTES_PER_PIXEL
    return max(1, budget // per_group)


def pixel_stats(pred: torch.Tensor, target: torch.Tensor, group_size: int, num_frames: int, with_ssim: bool,
                backend: str) -> torch.Tensor:
    """(MAE, MSE, SSIM) (B*G*F, 3) of predicted frames pred (B*G*F, 3, H, W) against target (B*F, 3, H, W), both in
    the compute dtype (float32 or float64); the SSIM column is 0 unless ``with_ssim``. ``backend``: "reference" or
    "triton" (as ``rlvrw.ops._backend.resolve`` chose)."""
    num_groups = target.shape[0] // num_frames
    step = _groups_per_chunk(pred, group_size, num_frames) if with_ssim else num_groups
    rows_p, rows_t = group_size * num_frames, num_frames
    stats = []
    for g0 in range(0, num_groups, step):
        p = pred[g0 * rows_p : (g0 + step) * rows_p]
        t = target[g0 * rows_t : (g0 + step) * rows_t]
        moments = ssim_moments(p, t, group_size, num_frames) if with_ssim else (None, None)
        if backend == "reference":
            stats.append(_stats_reference(p, t, *moments, group_size, num_frames))
        else:
            stats.append(_FrameStatsFunction.apply(p, t, *moments, group_size, num_frames))
    return torch.cat(stats)
