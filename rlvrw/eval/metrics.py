"""Per-frame metrics of predicted video: MAE, MSE, PSNR, SSIM, LPIPS, and best-of-N selection over a group of samples.

Frames are (N, C, H, W) in [0, 1] (C = 3 for LPIPS). Every metric returns (N,), one value per frame, computed in a
batch on the frames' device, in float32 (float64 for float64 frames). Averages over frames are the caller's.
The conventions are the RLVR-World paper's:

* MAE and MSE over channels and pixels (MAE is the L1 term of RLVR-World's reward).
* PSNR per image with value range 1: ``10 * log10(1 / MSE)`` (identical frames give inf).
* SSIM (Wang et al. 2004) with an 11-tap Gaussian window of sigma 1.5, per channel over the pixels whose window lies
  inside the image, then averaged over channels; K1 = 0.01, K2 = 0.03, value range 1. This is scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
* LPIPS v0.1 with the VGG backbone by default, on [0, 1] frames (``rlvrw.models.LPIPS(..., normalize=True)``).
* The paper reports MSE, SSIM and LPIPS multiplied by 100: ``frame_metrics(..., x100=True)``.

The math lives in ``rlvrw.reference.reward``, which ``rlvrw.ops.frame_reward`` (the same metrics as RL rewards) is
checked against: a reward and an evaluation of the same frames agree per frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlvrw.models.lpips import LPIPS
from rlvrw import checks
from rlvrw.reference import reward as reference
from rlvrw.reference.logprobs import compute_dtype
from rlvrw.reference.reward import SSIM_K1, SSIM_K2, gaussian_window  # noqa: F401 (this module's public names)

X100_METRICS = ("mse", "ssim", "lpips")  # the metrics the paper reports x100

_LPIPS_MODELS: dict[tuple[str, str], LPIPS] = {}


def _check_frames(pred: torch.Tensor, target: torch.Tensor, channels: int | None = None) -> torch.dtype:
    checks.tensor("pred", pred, dims=(4,))
    checks.tensor("target", target, dims=(4,))
    checks.shape("target", target, tuple(pred.shape), "pred's shape (N, C, H, W)")
    checks.same_device(pred=pred, target=target)
    if channels is not None and pred.shape[1] != channels:
        raise ValueError(f"pred must have {channels} channels (N, {channels}, H, W), got shape {tuple(pred.shape)}")
    return compute_dtype(pred.dtype)


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per frame, (N,)."""
    dtype = _check_frames(pred, target)
    return (pred.to(dtype) - target.to(dtype)).abs().mean(dim=(1, 2, 3))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per frame, (N,)."""
    dtype = _check_frames(pred, target)
    return (pred.to(dtype) - target.to(dtype)).square().mean(dim=(1, 2, 3))


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per frame in dB, ``10 * log10(data_range^2 / MSE)``, (N,)."""
    checks.positive("data_range", data_range)
    return 10.0 * torch.log10(data_range**2 / mse(pred, target))


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity per frame, (N,): Gaussian-weighted local means, variances and covariance of each
    channel, the SSIM map over the pixels whose window lies inside the frame, its mean, averaged over channels."""
    dtype = _check_frames(pred, target)
    checks.positive("data_range", data_range)
    checks.positive("sigma", sigma)
    checks.integer("window_size", window_size)
    if window_size % 2 == 0:
        raise ValueError(f"window_size must be odd, got {window_size!r}")
    if min(pred.shape[-2:]) < window_size:
        raise ValueError(f"pred frames are {pred.shape[-2]}x{pred.shape[-1]}; SSIM with a {window_size}-tap window "
                         "needs at least that size")
    return reference.ssim(pred.to(dtype), target.to(dtype), data_range, window_size, sigma)


def lpips_model(net: str = "vgg", device="cpu") -> LPIPS:
    """The LPIPS network for ``net`` on ``device``, loaded once per process (see ``rlvrw.models.LPIPS`` for where
    its weights come from)."""
    key = (net, str(torch.device(device)))
    if key not in _LPIPS_MODELS:
        _LPIPS_MODELS[key] = LPIPS(net).to(device)
    return _LPIPS_MODELS[key]


def lpips(
    pred: torch.Tensor, target: torch.Tensor, net: str = "vgg", *, model: LPIPS | None = None, batch_size: int = 64
) -> torch.Tensor:
    """LPIPS v0.1 per frame, (N,), for frames in [0, 1]; in batches of ``batch_size`` frames, without autograd.
    ``model`` overrides the cached ``lpips_model(net, pred.device)``."""
    dtype = _check_frames(pred, target, channels=3)
    checks.integer("batch_size", batch_size)
    if model is None:
        model = lpips_model(net, pred.device)
    with torch.no_grad():
        values = [
            model(pred[i : i + batch_size].to(dtype), target[i : i + batch_size].to(dtype), normalize=True).view(-1)
            for i in range(0, pred.shape[0], batch_size)
        ]
    return torch.cat(values).to(dtype) if values else torch.empty(0, dtype=dtype, device=pred.device)


def frame_metrics(
    pred: torch.Tensor, target: torch.Tensor, net: str = "vgg", *, x100: bool = False, model: LPIPS | None = None
) -> dict[str, torch.Tensor]:
    """``{"mse", "psnr", "ssim", "lpips"}`` per frame, each (N,); ``x100`` multiplies MSE, SSIM and LPIPS by 100,
    the paper's reporting convention."""
    values = {
        "mse": mse(pred, target),
        "psnr": psnr(pred, target),
        "ssim": ssim(pred, target),
        "lpips": lpips(pred, target, net, model=model),
    }
    if x100:
        values = {name: v * 100 if name in X100_METRICS else v for name, v in values.items()}
    return values


def best_of_n(scores: torch.Tensor, group_size: int, maximize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of each group of ``group_size`` consecutive scores (B*G,) -> (values (B,), flat indices (B,)).

    ``maximize=False`` for metrics where lower is better (MSE, LPIPS). The indices select the chosen samples' other
    metrics (``mse[idx]``). A NaN score wins its group, so a broken sample is never hidden behind a good one.
    """
    checks.tensor("scores", scores, dims=(1,))
    checks.integer("group_size", group_size)
    if scores.numel() % group_size or scores.numel() == 0:
        raise ValueError(f"group_size ({group_size}) must divide the number of scores ({scores.numel()}), which is > 0")
    grouped = scores.view(-1, group_size)
    values, within = grouped.max(dim=1) if maximize else grouped.min(dim=1)
    offsets = torch.arange(0, scores.numel(), group_size, device=scores.device)
    return values, offsets + within
