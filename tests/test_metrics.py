"""rlvrw.eval.metrics: MSE, PSNR and SSIM against scikit-image (an independent implementation) on real RT-1 frames and
on random frames of awkward sizes; LPIPS through rlvrw.models.LPIPS; the x100 convention; best-of-N."""

import numpy as np
import pytest
import torch

from conftest import EXAMPLE_DATA
from rlvrw.eval import metrics
from rlvrw.models import LPIPS

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the independent SSIM/PSNR check")


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """The paper's SSIM as scikit-image computes it, on one (C, H, W) frame pair."""
    return skimage_metrics.structural_similarity(
        a, b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


def rt1_frames() -> torch.Tensor:
    path = EXAMPLE_DATA / "video" / "fractal_sample.npz"
    return torch.from_numpy(np.load(path)["image"][:6]).permute(0, 3, 1, 2).double() / 255.0


def noisy(frames: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (frames + std * torch.randn(frames.shape, generator=g, dtype=frames.dtype)).clamp(0, 1)


@pytest.mark.parametrize("source", ["rt1", "random"])
def test_ssim_and_psnr_match_scikit_image(source):
    if source == "rt1":
        target = rt1_frames()
        pred = torch.cat([noisy(target[:3], 0.03), target[3:4].roll(5, dims=-1), target[4:]])  # noise, shift, equal
    else:
        g = torch.Generator().manual_seed(1)
        target = torch.rand(4, 3, 23, 37, generator=g, dtype=torch.float64)
        pred = noisy(target, 0.2)
    s, p, m = metrics.ssim(pred, target), metrics.psnr(pred, target), metrics.mse(pred, target)
    for i in range(pred.shape[0]):
        a, b = target[i].numpy(), pred[i].numpy()
        assert abs(s[i].item() - skimage_ssim(a, b)) < 1e-10
        assert m[i].item() == pytest.approx(skimage_metrics.mean_squared_error(a, b), rel=1e-12)
        if m[i] > 0:
            want = skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
            assert p[i].item() == pytest.approx(want, rel=1e-12)
        else:
            assert p[i].item() == float("inf")
    # float32 frames: float32 math, close to the float64 answer
    s32 = metrics.ssim(pred.float(), target.float())
    assert s32.dtype == torch.float32 and torch.allclose(s32.double(), s, atol=1e-5)
    assert torch.allclose(metrics.psnr(pred.bfloat16(), target.bfloat16()).double(), p, rtol=0.05)


def test_ssim_of_identical_frames_is_one():
    x = torch.rand(2, 3, 16, 11)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2))


def test_lpips_metric_is_the_network_on_zero_one_frames():
    model = LPIPS("alex", random_weights=True)
    pred, target = torch.rand(5, 3, 32, 34), torch.rand(5, 3, 32, 34)
    got = metrics.lpips(pred, target, model=model, batch_size=2)
    assert got.shape == (5,)
    assert torch.allclose(got, model(2 * pred - 1, 2 * target - 1).flatten(), rtol=1e-6)


def test_frame_metrics_and_the_x100_convention():
    model = LPIPS("vgg", random_weights=True)
    pred, target = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    plain = metrics.frame_metrics(pred, target, model=model)
    scaled = metrics.frame_metrics(pred, target, model=model, x100=True)
    assert set(plain) == {"mse", "psnr", "ssim", "lpips"}
    for name in plain:
        factor = 100.0 if name in metrics.X100_METRICS else 1.0
        assert torch.allclose(scaled[name], plain[name] * factor), name


def test_best_of_n():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    values, index = metrics.best_of_n(scores, 3)
    assert values.tolist() == pytest.approx([0.5, 0.9]) and index.tolist() == [1, 3]
    values, index = metrics.best_of_n(scores, 3, maximize=False)
    assert values.tolist() == pytest.approx([0.1, 0.2]) and index.tolist() == [0, 4]
    scores[4] = float("nan")
    values, index = metrics.best_of_n(scores, 3)
    assert values[1].isnan() and index[1].item() == 4  # a broken sample is never hidden


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: metrics.mse(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9)), "target"),
        (lambda: metrics.psnr(torch.rand(3, 8, 8), torch.rand(3, 8, 8)), "pred"),
        (lambda: metrics.ssim(torch.rand(1, 3, 10, 20), torch.rand(1, 3, 10, 20)), "at least"),
        (lambda: metrics.ssim(torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 20), window_size=4), "window_size"),
        (lambda: metrics.lpips(torch.rand(1, 1, 40, 40), torch.rand(1, 1, 40, 40)), "3 channels"),
        (lambda: metrics.best_of_n(torch.rand(5), 2), "group_size"),
        (lambda: metrics.best_of_n(torch.rand(2, 2), 2), "scores"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
