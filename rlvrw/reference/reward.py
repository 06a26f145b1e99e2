"""Reference LPIPS layer distance and the L1 + LPIPS reward: the spec of ``rlvrw.ops.l1_lpips_reward`` and of
``kernels/lpips_tail.py``.

LPIPS (Zhang et al. 2018) compares two images through the feature maps ("taps") of a backbone: at every pixel of a
tap, each feature vector is scaled to unit length over the channels, the two are subtracted, squared, weighted per
channel with non-negative learned weights (a 1x1 convolution to one channel), and averaged over the pixels; the
distance is the sum over taps. ``lpips_layer_distance`` is one tap of that.

Unit length: the ``lpips`` package divides by ``sqrt(sum_c f_c^2) + 1e-10``. Its gradient with respect to the
features is NaN where a feature vector is exactly zero (the derivative of the square root at 0; in the full network
the ReLU in front of each tap happens to mask it, a product-form mask would not). Here the epsilon goes inside the root:
``f / sqrt(sum_c f_c^2 + 1e-20)``, finite everywhere with a gradient of at most 1e10 per unit. How far that moves the
value: the relative change of a normalized vector is below ``1e-10 / |f|``. In float32 both epsilons vanish in
rounding once ``|f| > 2e-3`` (then the two forms agree bit for bit); real backbone features have norms of order 1 to
1e3, so LPIPS values agree with the package's to float32 rounding. A zero vector normalizes to 0 in both forms.

The reward of a video world model's predictions is, per predicted frame,
``-(l1_weight * mean|pred - target| + lpips_weight * LPIPS(2 * pred - 1, 2 * target - 1))`` with frames in [0, 1],
and per sample a weighted sum over frames (``frame_weights``). ``l1_lpips_reward`` computes it the plain way, with the
ground truth repeated for every prediction of its group; ``rlvr_world_reward`` is the way the RLVR-World reference
code does it (LPIPS in micro-batches of 8 under bf16 autocast, a separate L1), the baseline of the benchmarks.
"""

from __future__ import annotations

import torch

from rlvrw.reference.logprobs import compute_dtype
from rlvrw.reference.precision import full_fp32

NORM_EPS = 1e-10  # the lpips package's epsilon; it enters the square root squared
FRAME_REDUCTIONS = ("mean", "last", "discounted")
PIXEL_METRICS = ("mae", "mse", "psnr", "ssim")  # computed from the pixels alone
METRICS = PIXEL_METRICS + ("lpips",)
HIGHER_IS_BETTER = frozenset({"psnr", "ssim"})  # enter the reward as they are; the others negated
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
PSNR_CAP_DB = 100.0  # an MSE of 1e-10, far below 8-bit rounding


def normalize_channels(feat: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``feat / sqrt(sum_c feat^2 + eps^2)`` over dim 1, in float32 (float64 for float64 input)."""
    f = feat.to(compute_dtype(feat.dtype))
    return f / torch.sqrt(f.square().sum(dim=1, keepdim=True) + eps * eps)


def lpips_layer_distance(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    weight: torch.Tensor,
    group_size: int = 1,
    num_frames: int = 1,
    spatial: bool = False,
) -> torch.Tensor:
    """One tap of LPIPS: ``sum_c weight_c (n0_c - n1_c)^2`` with ``n = normalize_channels(feat)``, averaged over pixels.

    feat0 (B*G*F, C, h, w) with rows laid out (B, G, F); feat1 (B*F, C, h, w) laid out (B, F): row (b, g, f) of feat0
    is compared with row (b, f) of feat1, so a ground truth is normalized once for the G predictions of its group
    (G = group_size, F = num_frames; both 1 for plain pairs). weight (C,). Returns (B*G*F,), or the per-pixel map
    (B*G*F, h, w) when ``spatial``; float32 (float64 for float64 features).
    """
    n0, n1 = normalize_channels(feat0), normalize_channels(feat1)
    c, h, w = n0.shape[1:]
    n0 = n0.reshape(-1, group_size, num_frames, c, h, w)
    n1 = n1.reshape(-1, 1, num_frames, c, h, w)
    per_pixel = ((n0 - n1).square() * weight.to(n0.dtype).view(c, 1, 1)).sum(dim=3).reshape(-1, h, w)
    return per_pixel if spatial else per_pixel.mean(dim=(1, 2))


def frame_weights(
    num_frames: int, reduction: str = "mean", gamma: float = 0.9, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Weights (F,) that turn per-frame rewards into one: ``"mean"`` 1/F each (the multi-step reward); ``"last"`` the
    last frame only; ``"discounted"`` ``gamma^f / sum_k gamma^k`` (frame 0 first, weights summing to 1). Made on the
    device from scalars, so no host-to-device copy (which would synchronise)."""
    frame = torch.arange(num_frames, dtype=dtype, device=device)
    if reduction == "mean":
        return torch.full_like(frame, 1.0 / num_frames)
    if reduction == "last":
        return (frame == num_frames - 1).to(dtype)
    discounts = torch.pow(gamma, frame)
    return discounts / discounts.sum()


def _frames(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*G, F, 3, H, W) and (B, F, 3, H, W) views of single-frame or multi-frame inputs."""
    if pred.dim() == 4:
        return pred.unsqueeze(1), target.unsqueeze(1)
    return pred, target


def _reduce_frames(per_frame: torch.Tensor, num_frames: int, frame_reduction: str, gamma: float) -> torch.Tensor:
    weights = frame_weights(num_frames, frame_reduction, gamma, per_frame.dtype, per_frame.device)
    return (per_frame.view(-1, num_frames) * weights).sum(dim=1)


def l1_lpips_reward(
    pred: torch.Tensor,
    target: torch.Tensor,
    group_size: int,
    lpips,
    l1_weight: float = 1.0,
    lpips_weight: float = 1.0,
    frame_reduction: str = "mean",
    gamma: float = 0.9,
) -> torch.Tensor:
    """The reward, written the plain way: ``-(l1_weight * L1 + lpips_weight * LPIPS)`` per frame, then over frames.

    pred (B*G, 3, H, W) or (B*G, F, 3, H, W) in [0, 1], laid out group by group; target (B, 3, H, W) or
    (B, F, 3, H, W). ``lpips`` is an LPIPS module called as ``lpips(x, y)`` on [-1, 1] images, giving (N, 1, 1, 1).
    The ground truth is repeated for every prediction. Returns (B*G,) in float32 (float64 for float64 input).
    """
    p, t = _frames(pred, target)
    num_frames = p.shape[1]
    dtype = compute_dtype(pred.dtype)
    p = p.flatten(0, 1).to(dtype)
    t = t.repeat_interleave(group_size, dim=0).flatten(0, 1).to(dtype)
    l1 = (p - t).abs().mean(dim=(1, 2, 3))
    distance = lpips(2 * p - 1, 2 * t - 1).reshape(-1).to(dtype)
    return _reduce_frames(-(l1_weight * l1 + lpips_weight * distance), num_frames, frame_reduction, gamma)


def gaussian_window(size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalized 1-D Gaussian of ``size`` taps (the SSIM window is its outer product with itself)."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def gaussian_filter(maps: torch.Tensor, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The Gaussian-weighted local means of maps (..., H, W) over the windows inside the map, (..., H-k+1, W-k+1):
    the separable window as a 1-D pass along the rows, then one along the columns. In full float32 on a GPU (TF32
    convolutions would cost SSIM its digits: variances are differences of nearby moments)."""
    h, w = maps.shape[-2:]
    g = gaussian_window(window_size, sigma, maps.dtype, maps.device)
    x = maps.reshape(-1, 1, h, w)
    with full_fp32(matmul=False):
        x = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    return x.view(*maps.shape[:-2], h - window_size + 1, w - window_size + 1)


def ssim_map(mu_x, mu_y, e_xx, e_yy, e_xy, data_range: float = 1.0) -> torch.Tensor:
    """SSIM at each window from the local moments: means, second moments and the cross moment."""
    var_x, var_y, cov = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """SSIM per frame (N,) of frames (N, C, H, W): the map's mean per channel, averaged over channels; float32
    (float64 for float64 frames)."""
    dtype = compute_dtype(pred.dtype)
    p, t = pred.to(dtype), target.to(dtype)
    mu_p, mu_t, e_pp, e_tt, e_pt = gaussian_filter(torch.stack([p, t, p * p, t * t, p * t]), window_size,
                                                   sigma).unbind(0)
    return ssim_map(mu_p, mu_t, e_pp, e_tt, e_pt, data_range).mean(dim=(2, 3)).mean(dim=1)


def psnr_from_mse(mse: torch.Tensor, cap_db: float | None = PSNR_CAP_DB) -> torch.Tensor:
    """``10 log10(1 / mse)`` (value range 1), at most ``cap_db`` (None: uncapped, an exact copy is inf). NaN stays."""
    value = -10.0 * torch.log10(mse)
    return value if cap_db is None else value.clamp(max=cap_db)


def frame_metric_values(pred: torch.Tensor, target: torch.Tensor, group_size: int, names, lpips=None,
                        psnr_cap_db: float | None = PSNR_CAP_DB) -> dict[str, torch.Tensor]:
    """The metrics ``names`` of every predicted frame, each (B*G*F,) in (b, g, f) order, the plain way: the ground
    truth repeated for every prediction. pred (B*G[, F], 3, H, W), target (B[, F], 3, H, W); ``lpips`` an LPIPS
    module called on [-1, 1] images (needed for "lpips")."""
    p, t = _frames(pred, target)
    dtype = compute_dtype(pred.dtype)
    p = p.flatten(0, 1).to(dtype)
    t = t.repeat_interleave(group_size, dim=0).flatten(0, 1).to(dtype)
    values = {}
    diff = p - t
    if "mae" in names:
        values["mae"] = diff.abs().mean(dim=(1, 2, 3))
    if "mse" in names or "psnr" in names:
        mse = diff.square().mean(dim=(1, 2, 3))
        values.update({"mse": mse, "psnr": psnr_from_mse(mse, psnr_cap_db)})
    if "ssim" in names:
        values["ssim"] = ssim(p, t)
    if "lpips" in names:
        values["lpips"] = lpips(2 * p - 1, 2 * t - 1).reshape(-1).to(dtype)
    return {name: values[name] for name in names}


def frame_reward(
    pred: torch.Tensor,
    target: torch.Tensor,
    group_size: int,
    weights: dict[str, float],
    lpips=None,
    frame_reduction: str = "mean",
    gamma: float = 0.9,
    psnr_cap_db: float | None = PSNR_CAP_DB,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_m weights[m] * (+-) metric_m`` per predicted frame (+ for PSNR and SSIM, - for the losses), reduced over
    frames by ``frame_reduction``; also each metric per sample (B*G,), reduced over frames the same way. Shapes as
    ``l1_lpips_reward``; float32 (float64 for float64 input)."""
    num_frames = 1 if pred.dim() == 4 else pred.shape[1]
    values = frame_metric_values(pred, target, group_size, list(weights), lpips, psnr_cap_db)
    per_frame = sum(w * (v if name in HIGHER_IS_BETTER else -v) for (name, w), v in zip(weights.items(),
                                                                                       values.values()))
    terms = {name: _reduce_frames(v, num_frames, frame_reduction, gamma) for name, v in values.items()}
    return _reduce_frames(per_frame, num_frames, frame_reduction, gamma), terms


def rlvr_world_reward(
    pred: torch.Tensor,
    target: torch.Tensor,
    group_size: int,
    lpips,
    l1_weight: float = 1.0,
    lpips_weight: float = 1.0,
    micro_batch: int = 8,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """The reward as the RLVR-World reference code computes it: the ground truth repeated for every sample, LPIPS in
    micro-batches of ``micro_batch`` pairs under autocast to ``autocast_dtype`` (None: no autocast), and the L1 as a
    separate pass. Multi-frame inputs give the mean over frames. Same shapes as ``l1_lpips_reward``."""
    p, t = _frames(pred, target)
    num_frames = p.shape[1]
    p = p.flatten(0, 1)
    t = t.repeat_interleave(group_size, dim=0).flatten(0, 1)
    distances = []
    for start in range(0, p.shape[0], micro_batch):
        p_mb, t_mb = p[start : start + micro_batch], t[start : start + micro_batch]
        with torch.autocast(p.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            distances.append(lpips(2 * p_mb - 1, 2 * t_mb - 1).reshape(-1).float())
    l1 = (p.float() - t.float()).abs().mean(dim=(1, 2, 3))
    per_frame = -(l1_weight * l1 + lpips_weight * torch.cat(distances))
    return per_frame.view(-1, num_frames).mean(dim=1)
