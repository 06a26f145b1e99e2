"""``rlvrw.ops.frame_reward``: every metric and weighted sums on both backends against the float64 reference
(``rlvrw.reference.reward.frame_reward``, the ground truth repeated), gradients included; per sample equal to
``rlvrw.eval.metrics`` (and so to scikit-image); the pixel-stats Triton kernels at awkward sizes, strides and dtypes
with poisoned outputs; NaN kept per sample; the returned terms; bad inputs.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before
the kernels are imported); with one, the tests of the kernels and of the op's backends run compiled on CUDA tensors.
"""

import pytest
import torch

import rlvrw.ops as ops
from rlvrw.eval import metrics
from rlvrw.kernels import frame_stats as K
from rlvrw.models import LPIPS
from rlvrw.ops.frame_stats import pixel_stats, ssim_moments
from rlvrw.ops.reward import REWARD_METRICS, reward_weights
from rlvrw.reference import reward as ref

BACKENDS = ("reference", "triton")
SSIM_C = (ref.SSIM_K1**2, ref.SSIM_K2**2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernels and the op's backends run


def random_lpips(net: str = "alex", seed: int = 0) -> LPIPS:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LPIPS(net, random_weights=True)


@pytest.fixture(scope="module")
def alex64():
    return random_lpips().double()


@pytest.fixture(scope="module")
def alex64_device():
    """alex64 on DEVICE, for the op's backends."""
    return random_lpips().double().to(DEVICE)


def frames(B, G, F, H, W, dtype=torch.float64, seed=0, noise=0.15, device="cpu"):
    """pred (B*G[, F], 3, H, W) near target (B[, F], 3, H, W), both in [0, 1] on ``device`` (drawn on the CPU);
    F=None means single-frame."""
    g = torch.Generator().manual_seed(seed)
    shape = (B,) if F is None else (B, F)
    target = torch.rand(*shape, 3, H, W, generator=g, dtype=torch.float64)
    pred = target.repeat_interleave(G, dim=0) + noise * torch.randn(B * G, *shape[1:], 3, H, W, generator=g,
                                                                       dtype=torch.float64)
    return pred.clamp(0, 1).to(device, dtype), target.to(device, dtype)


def plain(model):
    """The reference's LPIPS call: a module on [-1, 1] images."""
    return lambda x, y: model(x, y)


# ---------------------------------------------------------------------------------------------------------------------
# metric names
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_weights():
    assert reward_weights("l1+lpips") == {"mae": 1.0, "lpips": 1.0}
    assert reward_weights("ssim") == {"ssim": 1.0}
    assert reward_weights(" mae + 0.5*lpips ") == {"mae": 1.0, "lpips": 0.5}
    assert reward_weights({"l1": 2, "mae": 1, "psnr": 0.1}) == {"mae": 3.0, "psnr": 0.1}
    for name in REWARD_METRICS:
        assert reward_weights(name)


@pytest.mark.parametrize("metric", ["mase", "l2", "", "mae+", "x*mae", "mae+-1*lpips", {}, {"ssim": -1.0}, 3])
def test_bad_metrics_are_refused(metric):
    with pytest.raises(ValueError, match="metric"):
        reward_weights(metric)


def test_an_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match=r"\['mae', 'mse', 'psnr', 'ssim', 'lpips', 'l1\+lpips'\]"):
        reward_weights("nope")
    with pytest.raises(ValueError, match="'nope'; choices"):
        reward_weights({"nope": 1.0})


# ---------------------------------------------------------------------------------------------------------------------
# the op against the float64 reference
# ---------------------------------------------------------------------------------------------------------------------

CASES = [  # (metric, B, G, F, H, W, frame_reduction)
    ("mae", 2, 3, None, 13, 17, "mean"),
    ("mse", 1, 4, 2, 11, 11, "last"),
    ("psnr", 2, 2, 3, 12, 23, "discounted"),
    ("ssim", 2, 3, None, 19, 14, "mean"),
    ("ssim", 1, 2, 3, 11, 16, "discounted"),
    ("mae+0.3*ssim+0.01*psnr+2*mse", 3, 2, 2, 15, 13, "mean"),
    ("lpips", 2, 2, None, 33, 31, "mean"),
    ("l1+lpips", 2, 3, 2, 31, 34, "discounted"),
    ("0.5*ssim+lpips", 1, 3, None, 32, 32, "last"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric, B, G, F, H, W, reduction", CASES)
def test_op_matches_reference_with_gradients(alex64_device, backend, metric, B, G, F, H, W, reduction):
    alex64 = alex64_device
    pred, target = frames(B, G, F, H, W, device=DEVICE)
    upstream = torch.randn(B * G, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    p_ref = pred.clone().requires_grad_()
    want, want_terms = ref.frame_reward(p_ref, target, G, reward_weights(metric), plain(alex64), reduction, 0.8)
    (want * upstream).sum().backward()
    p_op = pred.clone().requires_grad_()
    got, terms = ops.frame_reward(p_op, target, G, metric, alex64, reduction, 0.8, return_terms=True,
                                  backend=backend)
    (got * upstream).sum().backward()
    assert got.shape == (B * G,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert set(terms) == set(want_terms)
    for name in terms:
        torch.testing.assert_close(terms[name], want_terms[name], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(p_op.grad, p_ref.grad, rtol=1e-9, atol=1e-14)
    assert p_op.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_to_the_eval_metrics_per_sample(alex64_device, backend):
    """Each single-metric reward is +- rlvrw.eval.metrics on the same frame pairs (the eval metrics are checked
    against scikit-image in test_metrics.py)."""
    alex64 = alex64_device
    B, G = 2, 3
    pred, target = frames(B, G, None, 32, 36, device=DEVICE)
    repeated = target.repeat_interleave(G, dim=0)
    expected = {
        "mae": -metrics.mae(pred, repeated),
        "mse": -metrics.mse(pred, repeated),
        "psnr": metrics.psnr(pred, repeated),
        "ssim": metrics.ssim(pred, repeated),
        "lpips": -metrics.lpips(pred, repeated, model=alex64),
    }
    for name, want in expected.items():
        got = ops.frame_reward(pred, target, G, name, alex64, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, msg=name)


def test_ssim_reward_equals_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    pred, target = frames(1, 3, None, 21, 26, seed=4)
    got = ops.frame_reward(pred.to(DEVICE), target.to(DEVICE), 3, "ssim", backend="triton")
    for i in range(3):
        want = skimage_metrics.structural_similarity(
            target[0].numpy(), pred[i].numpy(), data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False)
        assert abs(got[i].item() - want) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_bf16_inputs(backend):
    pred, target = frames(2, 2, 2, 16, 20, device=DEVICE)
    exact = ops.frame_reward(pred, target, 2, "mae+ssim+0.1*psnr", backend="reference")
    fp32 = ops.frame_reward(pred.float(), target.float(), 2, "mae+ssim+0.1*psnr", backend=backend)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32.double(), exact, rtol=1e-5, atol=1e-5)
    bf16 = ops.frame_reward(pred.bfloat16(), target.bfloat16(), 2, "mae+ssim+0.1*psnr", backend=backend)
    assert bf16.dtype == torch.float32  # bf16 frames, float32 math
    torch.testing.assert_close(bf16.double(), exact, rtol=0, atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_prediction_and_nan_per_sample(backend):
    pred, target = frames(2, 3, None, 12, 14, device=DEVICE)
    pred[1] = target[0]
    pred[4, 1, 3, 7] = float("nan")
    for metric, perfect in (("mae", 0.0), ("mse", 0.0), ("psnr", ref.PSNR_CAP_DB), ("ssim", 1.0)):
        reward = ops.frame_reward(pred, target, 3, metric, backend=backend)
        assert reward[1].item() == pytest.approx(perfect, abs=1e-12), metric
        assert reward[4].isnan() and torch.isfinite(reward[[0, 1, 2, 3, 5]]).all(), metric
    p = pred.clone().requires_grad_()
    ops.frame_reward(p, target, 3, "mse+ssim", backend=backend).sum().backward()
    assert p.grad[4].isnan().any() and torch.isfinite(p.grad[[0, 1, 2, 3, 5]]).all()


def test_psnr_cap():
    pred, target = frames(1, 2, None, 12, 12)
    pred[0] = target[0]
    assert ops.frame_reward(pred, target, 2, "psnr", psnr_cap_db=60.0)[0].item() == 60.0


def test_l1_lpips_reward_is_the_l1_plus_lpips_case(alex64):
    pred, target = frames(2, 2, 2, 32, 32)
    want = ops.frame_reward(pred, target, 2, {"mae": 0.7, "lpips": 1.3}, alex64)
    torch.testing.assert_close(ops.l1_lpips_reward(pred, target, 2, alex64, 0.7, 1.3), want, rtol=0, atol=0)
    reward, terms = ops.frame_reward(pred, target, 2, "l1+lpips", alex64, return_terms=True)
    torch.testing.assert_close(reward, -(terms["mae"] + terms["lpips"]), rtol=0, atol=1e-15)
    weighted, own_terms = ops.l1_lpips_reward(pred, target, 2, alex64, 0.7, 1.3, return_terms=True)
    torch.testing.assert_close(weighted, want, rtol=0, atol=0)
    assert set(own_terms) == {"mae", "lpips"}
    for name in own_terms:  # the unweighted terms, so a trainer logs them without inverting the reward
        torch.testing.assert_close(own_terms[name], terms[name], rtol=0, atol=0)
    torch.testing.assert_close(weighted, -(0.7 * own_terms["mae"] + 1.3 * own_terms["lpips"]), rtol=1e-6, atol=1e-7)


def test_pixel_only_rewards_need_no_lpips_and_empty_batches():
    pred, target = frames(2, 2, None, 12, 12)
    assert ops.frame_reward(pred, target, 2, "ssim").shape == (4,)
    reward, terms = ops.frame_reward(pred[:0], target[:0], 2, "mae+ssim", return_terms=True)
    assert reward.shape == (0,) and set(terms) == {"mae", "ssim"}


# ---------------------------------------------------------------------------------------------------------------------
# the Triton kernels (interpreted on CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------------------

KERNEL_CASES = [  # (B, G, F, H, W, block, n_split, with_ssim, channels_last)
    (2, 3, 1, 13, 17, 64, 3, True, False),  # 3*13*17 = 663 elements: not a multiple of the block
    (1, 2, 2, 11, 11, 32, 1, True, True),  # a 1x1 SSIM map
    (3, 1, 1, 7, 9, 128, 2, False, True),
]


def kernel_inputs(B, G, F, H, W, channels_last, with_ssim, dtype=torch.float64):
    pred, target = frames(B, G, F, H, W, dtype=dtype, seed=5, device=DEVICE)
    pred, target = pred.reshape(-1, 3, H, W), target.reshape(-1, 3, H, W)
    if channels_last:
        pred = pred.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    moments = ssim_moments(pred.to(compute), target.to(compute), G, F) if with_ssim else (None, None)
    return pred, target, moments


def reference_stats(pred, target, G, F, with_ssim):
    """(MAE, MSE, SSIM) of prediction row p against ground-truth row (p // (G*F)) * F + p % F."""
    rows = torch.tensor([(p // (G * F)) * F + p % F for p in range(pred.shape[0])], device=target.device)
    values = ref.frame_metric_values(pred, target[rows], 1, ["mae", "mse"] + ["ssim"] * with_ssim)
    values.setdefault("ssim", torch.zeros_like(values["mae"]))
    return torch.stack([values["mae"], values["mse"], values["ssim"]], dim=1)


@pytest.mark.parametrize("B, G, F, H, W, block, n_split, with_ssim, channels_last", KERNEL_CASES)
def test_stats_kernel_forward(B, G, F, H, W, block, n_split, with_ssim, channels_last):
    pred, target, moments = kernel_inputs(B, G, F, H, W, channels_last, with_ssim)
    out = torch.full((B * G * F, n_split, 3), float("nan"), dtype=torch.float64, device=DEVICE)  # poison
    K.frame_stats_forward(pred, target, *moments, G, F, SSIM_C, n_split=n_split, out=out, block=block)
    want = reference_stats(pred, target, G, F, with_ssim)
    torch.testing.assert_close(out.sum(dim=1), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("B, G, F, H, W, block, n_split, with_ssim, channels_last", KERNEL_CASES)
def test_stats_kernel_backward_matches_autograd(B, G, F, H, W, block, n_split, with_ssim, channels_last):
    pred, target, _ = kernel_inputs(B, G, F, H, W, channels_last, with_ssim)
    grad_stats = torch.randn(B * G * F, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    p = pred.detach().clone().requires_grad_()
    moments = ssim_moments(p, target, G, F) if with_ssim else (None, None)
    stats = pixel_stats(p, target, G, F, with_ssim, "reference")
    (stats * grad_stats).sum().backward()
    want_pred = p.grad
    # the kernel's own gradients: to the pixels directly and to the moments, then through the convolutions
    p2 = pred.detach().clone().requires_grad_()
    moments = ssim_moments(p2, target, G, F) if with_ssim else (None, None)
    grad_pred, grad_moments = K.frame_stats_backward(pred, target, *(m.detach() if m is not None else None
                                                                     for m in moments), grad_stats, G, F, SSIM_C,
                                                     block=block)
    if with_ssim:
        (moments[0] * grad_moments).sum().backward()
        grad_pred = grad_pred + p2.grad
    torch.testing.assert_close(grad_pred, want_pred, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_kernel_low_precision_frames(dtype):
    pred, target, moments = kernel_inputs(2, 2, 1, 14, 12, True, True, dtype=dtype)
    got = K.frame_stats_forward(pred, target, *moments, 2, 1, SSIM_C, block=64).sum(dim=1)
    assert got.dtype == torch.float32
    want = reference_stats(pred.float(), target.float(), 2, 1, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(metric="psnr2"), "metric must be one of"),
        (dict(metric={"ssim": -0.5}), "metric"),
        (dict(metric="lpips", lpips=None), "lpips"),
        (dict(metric="mae+lpips", lpips=object()), "lpips"),
        (dict(pred=torch.rand(4, 3, 10, 12), target=torch.rand(2, 3, 10, 12)), "SSIM"),
        (dict(metric="lpips", pred=torch.rand(4, 3, 20, 20), target=torch.rand(2, 3, 20, 20)), "at least 31"),
        (dict(pred=torch.rand(4, 3, 32)), "pred"),
        (dict(target=torch.rand(3, 3, 32, 32)), "target"),
        (dict(group_size=3), "group_size"),
        (dict(frame_reduction="sum"), "frame_reduction"),
        (dict(gamma=1.5), "gamma"),
        (dict(psnr_cap_db=0), "psnr_cap_db"),
        (dict(precision="fp8"), "precision"),
        (dict(micro_batch=0), "micro_batch"),
        (dict(backend="cuda"), "cuda"),
    ],
)
def test_bad_arguments_name_themselves(change, match):
    args = dict(pred=torch.rand(4, 3, 32, 32), target=torch.rand(2, 3, 32, 32), group_size=2, metric="ssim",
                lpips=random_lpips())
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.frame_reward(**args)


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["mae", "mse", "psnr", "ssim", "mae+ssim+0.01*psnr"])
def test_gpu_pixel_rewards_match_reference_without_host_sync(metric):
    """At RLVR-World's frame size: the Triton path within float32 rounding of the float64 reference, gradients too,
    and no host synchronisation in the call."""
    B, G = 4, 16
    pred, target = frames(B, G, None, 256, 320)
    want = ref.frame_reward(pred, target, G, reward_weights(metric))[0]
    pred32, target32 = pred.float().cuda(), target.float().cuda()
    ops.frame_reward(pred32, target32, G, metric)  # warm-up and compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ops.frame_reward(pred32, target32, G, metric)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)
    grads = []
    for backend in BACKENDS:
        p = pred32.clone().requires_grad_()
        ops.frame_reward(p, target32, G, metric, backend=backend).sum().backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-8)


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                    reason="this torch has only the legacy TF32 flags")
def test_ssim_after_the_user_set_the_new_tf32_api():
    """torch refuses to read the legacy allow_tf32 flag once conv and rnn precisions differ; SSIM's filter must not
    read it (the self-check sets the new API, and so may a user)."""
    saved = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        pred, truth = torch.rand(4, 3, 16, 16), torch.rand(2, 3, 16, 16)
        reward = ops.frame_reward(pred, truth, 2, "ssim")
    finally:
        torch.backends.cudnn.conv.fp32_precision = saved
    assert torch.isfinite(reward).all() and reward.shape == (4,)
