"""The L1 + LPIPS reward: the Triton kernels (``kernels/lpips_tail.py``) and the op ``rlvrw.ops.l1_lpips_reward`` on
both backends, against the plain reference ``rlvrw.reference.reward`` in float64, gradients included. LPIPS networks
have random weights here (the real ones are tested in test_lpips.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before
the kernels are imported); with one, the tests of the kernels and of the op's backends run compiled on CUDA tensors.
"""

import pytest
import torch

import rlvrw.ops as ops
from rlvrw.kernels import lpips_tail as K
from rlvrw.models import LPIPS
from rlvrw.ops.reward import chunk_rows
from rlvrw.reference import reward as ref

BACKENDS = ("reference", "triton")
EPS = ref.NORM_EPS
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernels and the op's backends run


def random_lpips(net: str, seed: int = 0) -> LPIPS:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LPIPS(net, random_weights=True)


@pytest.fixture(scope="module")
def alex64():
    return random_lpips("alex").double()


@pytest.fixture(scope="module")
def alex64_device():
    """alex64 on DEVICE, for the op's backends."""
    return random_lpips("alex").double().to(DEVICE)


def frames(B, G, F, H, W, dtype=torch.float64, seed=0, device="cpu"):
    """pred (B*G[, F], 3, H, W) near target (B[, F], 3, H, W), both in [0, 1] on ``device`` (drawn on the CPU);
    F=None means single-frame."""
    g = torch.Generator().manual_seed(seed)
    shape = (B,) if F is None else (B, F)
    target = torch.rand(*shape, 3, H, W, generator=g, dtype=torch.float64)
    pred = target.repeat_interleave(G, dim=0) + 0.2 * torch.randn(B * G, *shape[1:], 3, H, W, generator=g,
                                                                     dtype=torch.float64)
    return pred.clamp(0, 1).to(device, dtype), target.to(device, dtype)


def features(n, C, h, w, dtype=torch.float64, seed=0, channels_last=False):
    """ReLU-like features on DEVICE with some all-zero feature vectors (pixels where every channel is dead)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, C, h, w, generator=g, dtype=torch.float64).relu()
    f[:, :, 0, 0] = 0.0
    f = f.to(DEVICE, dtype)
    return f.contiguous(memory_format=torch.channels_last) if channels_last else f


# ---------------------------------------------------------------------------------------------------------------------
# reference pieces
# ---------------------------------------------------------------------------------------------------------------------


def test_frame_weights():
    quarter = torch.full((4,), 0.25, dtype=torch.float64)
    assert torch.allclose(ref.frame_weights(4, "mean", dtype=torch.float64), quarter)
    assert ref.frame_weights(3, "last").tolist() == [0.0, 0.0, 1.0]
    w = ref.frame_weights(3, "discounted", 0.9, dtype=torch.float64)
    assert torch.allclose(w, torch.tensor([1.0, 0.9, 0.81], dtype=torch.float64) / 2.71)


def test_unit_length_matches_lpips_and_has_a_finite_gradient_at_zero():
    """Bit for bit the lpips package's f / (|f| + 1e-10) in float32 for norms above 2e-3; at a zero vector the
    lpips form's gradient is NaN, ours finite."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 64, 1, 1, generator=g)
    norms = torch.logspace(-2.5, 3, 400).view(-1, 1, 1, 1)
    f = f / f.norm(dim=1, keepdim=True) * norms
    lpips_form = f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)
    assert torch.equal(ref.normalize_channels(f), lpips_form)

    zero = torch.zeros(1, 8, 2, 2, requires_grad=True)
    (zero / (torch.sqrt(torch.sum(zero**2, dim=1, keepdim=True)) + 1e-10)).sum().backward()
    assert zero.grad.isnan().all()
    zero.grad = None
    ref.normalize_channels(zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_rlvr_world_way_equals_the_reference(alex64):
    pred, target = frames(2, 3, 2, 33, 31)
    want = ref.l1_lpips_reward(pred, target, 3, alex64)
    got = ref.rlvr_world_reward(pred, target, 3, alex64, micro_batch=5, autocast_dtype=None)
    assert torch.allclose(got.double(), want, atol=1e-12)
    model32 = random_lpips("alex")
    half = ref.rlvr_world_reward(pred.float(), target.float(), 3, model32, autocast_dtype=torch.bfloat16)
    assert torch.allclose(half.double(), want, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------------------
# the Triton kernels (interpreted on CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------------------

TAIL_CASES = [  # (C, h, w, G, F, B, n_split, channels_last)
    (37, 5, 7, 3, 2, 2, 3, False),
    (64, 1, 1, 1, 1, 3, 1, True),
    (130, 4, 3, 2, 1, 1, 2, True),
]


@pytest.mark.parametrize("C, h, w, G, F, B, n_split, channels_last", TAIL_CASES)
def test_tail_forward_matches_reference(C, h, w, G, F, B, n_split, channels_last):
    pred = features(B * G * F, C, h, w, seed=1, channels_last=channels_last)
    target = features(B * F, C, h, w, seed=2, channels_last=channels_last)
    weight = torch.rand(C, dtype=torch.float64).to(DEVICE)
    out = torch.full((B * G * F, n_split), float("nan"), dtype=torch.float64, device=DEVICE)  # poison: all written
    K.lpips_tail_forward(pred, target, weight, G, F, EPS, n_split=n_split, out=out)
    want = ref.lpips_layer_distance(pred, target, weight, G, F)
    assert torch.allclose(out.sum(dim=1), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_forward_low_precision_features(dtype):
    pred = features(6, 48, 6, 5, dtype=dtype, seed=3, channels_last=True)
    target = features(2, 48, 6, 5, dtype=dtype, seed=4, channels_last=True)
    weight = torch.rand(48).to(DEVICE)
    got = K.lpips_tail_forward(pred, target, weight, 3, 1, EPS).sum(dim=1)
    assert got.dtype == torch.float32
    want = ref.lpips_layer_distance(pred.double(), target.double(), weight.double(), 3, 1)
    assert torch.allclose(got.double(), want, rtol=1e-5)


@pytest.mark.parametrize("C, h, w, G, F, B, n_split, channels_last", TAIL_CASES)
def test_tail_backward_matches_autograd(C, h, w, G, F, B, n_split, channels_last):
    pred = features(B * G * F, C, h, w, seed=5, channels_last=channels_last).requires_grad_()
    target = features(B * F, C, h, w, seed=6, channels_last=channels_last)
    weight = torch.rand(C, dtype=torch.float64).to(DEVICE)
    grad_dist = torch.randn(B * G * F, dtype=torch.float64).to(DEVICE)
    (ref.lpips_layer_distance(pred, target, weight, G, F) * grad_dist).sum().backward()
    out = torch.full_like(pred, float("nan"))
    K.lpips_tail_backward(pred.detach(), target, weight, grad_dist, G, F, EPS, out=out)
    assert torch.isfinite(out).all()  # zero feature vectors included
    assert torch.allclose(out, pred.grad, rtol=1e-10, atol=1e-14)


def test_tail_nan_stays_in_its_rows():
    G, F = 3, 2
    pred, target = features(2 * G * F, 16, 3, 3, seed=7), features(2 * F, 16, 3, 3, seed=8)
    pred[4, 3, 1, 1] = float("nan")  # sample (b=0, g=2, f=0)
    target[3, 0, 2, 2] = float("nan")  # ground truth (b=1, f=1): the rows (1, g, 1) for every g
    weight = torch.rand(16, dtype=torch.float64).to(DEVICE)
    got = K.lpips_tail_forward(pred, target, weight, G, F, EPS, n_split=2).sum(dim=1)
    nan_rows = {4} | {G * F + g * F + 1 for g in range(G)}
    assert {i for i in range(2 * G * F) if got[i].isnan()} == nan_rows


@pytest.mark.parametrize(
    "B, G, F, chunk, channels_last, x_dtype, dtype",
    [
        (3, 2, 1, 2, True, torch.float32, torch.float32),  # the last chunk holds one group of two
        (2, 3, 2, 1, False, torch.bfloat16, torch.float32),
        (2, 2, 3, 5, True, torch.float64, torch.float64),
    ],
)
def test_scale_l1_layout_and_values(B, G, F, chunk, channels_last, x_dtype, dtype):
    H, W = 5, 7
    pred, target = frames(B, G, F, H, W, dtype=dtype, device=DEVICE)
    pred_frames = pred.transpose(-1, -2).contiguous().transpose(-1, -2).reshape(-1, 3, H, W)  # odd strides
    target_frames = target.reshape(-1, 3, H, W)
    lp = random_lpips("alex")
    shift, scale = lp.input_shift.to(DEVICE, dtype), lp.input_scale.to(DEVICE, dtype)
    n_rows = B * (G + 1) * F
    x = torch.full((n_rows, 3, H, W), float("nan"), dtype=x_dtype, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    l1 = torch.full((B * G * F, 2), float("nan"), dtype=ref.compute_dtype(dtype), device=DEVICE)
    K.scale_l1(pred_frames, target_frames, shift, scale, G, F, chunk, x_dtype, channels_last,
               ref.compute_dtype(dtype), n_split=2, out=x, l1_out=l1, block=16)

    acc = ref.compute_dtype(dtype)
    scaled = lambda v: (((2 * v.to(acc) - 1) - shift.to(acc).view(1, 3, 1, 1)) / scale.to(acc).view(1, 3, 1, 1))  # noqa
    want, t_row, p_row = [], 0, 0
    for _, n_targets, n_preds in chunk_rows(B, G, F, chunk):
        want += [scaled(target_frames[t_row : t_row + n_targets]), scaled(pred_frames[p_row : p_row + n_preds])]
        t_row, p_row = t_row + n_targets, p_row + n_preds
    if x_dtype == torch.bfloat16:
        # one bf16 step: Triton's interpreter truncates float32 to bf16 where the GPU (and torch) round to nearest
        assert torch.allclose(x.float(), torch.cat(want).float(), rtol=2**-7, atol=0)
    elif DEVICE == "cpu" or x_dtype == torch.float64:
        assert torch.equal(x, torch.cat(want).to(x_dtype))
    else:  # compiled, Triton's float32 division is div.full.f32 (within 2 ulp), torch's is correctly rounded
        torch.testing.assert_close(x, torch.cat(want).to(x_dtype), rtol=4 * torch.finfo(x_dtype).eps, atol=0)
    t_rep = target.repeat_interleave(G, dim=0).reshape(-1, 3, H, W)
    want_l1 = (pred_frames.to(acc) - t_rep.to(acc)).abs().mean(dim=(1, 2, 3))
    assert torch.allclose(l1.sum(dim=1), want_l1, rtol=1e-6 if acc == torch.float32 else 1e-13)


# ---------------------------------------------------------------------------------------------------------------------
# the op, both backends, against the reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B, G, F, micro_batch, reduction, weights",
    [
        (2, 3, None, None, "mean", (1.0, 1.0)),
        (3, 2, 2, 5, "discounted", (0.5, 2.0)),  # micro_batch 5: one group per chunk
        (3, 2, 3, 20, "last", (1.0, 0.0)),  # two groups, then one
    ],
)
def test_op_matches_reference(alex64_device, backend, B, G, F, micro_batch, reduction, weights):
    alex64 = alex64_device
    pred, target = frames(B, G, F, 33, 31, device=DEVICE)
    kwargs = dict(l1_weight=weights[0], lpips_weight=weights[1])
    want = ref.l1_lpips_reward(pred, target, G, alex64, frame_reduction=reduction, **kwargs)
    got = ops.l1_lpips_reward(pred, target, G, alex64, frame_reduction=reduction, micro_batch=micro_batch,
                              backend=backend, **kwargs)
    assert got.shape == (B * G,) and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net", ["vgg", "squeeze"])
def test_op_other_backbones(backend, net):
    model = random_lpips(net).double().to(DEVICE)
    size = model.min_input_size
    pred, target = frames(2, 2, None, size + 1, size + 2, device=DEVICE)
    want = ref.l1_lpips_reward(pred, target, 2, model)
    assert torch.allclose(ops.l1_lpips_reward(pred, target, 2, model, backend=backend), want, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_gradient_matches_reference(alex64_device, backend):
    alex64 = alex64_device
    pred, target = frames(2, 2, 2, 32, 33, device=DEVICE)
    upstream = torch.randn(4, dtype=torch.float64).to(DEVICE)
    p_ref = pred.clone().requires_grad_()
    (ref.l1_lpips_reward(p_ref, target, 2, alex64, 0.7, 1.3, "discounted") * upstream).sum().backward()
    p_op = pred.clone().requires_grad_()
    reward = ops.l1_lpips_reward(p_op, target, 2, alex64, 0.7, 1.3, frame_reduction="discounted", micro_batch=4,
                                 backend=backend)
    (reward * upstream).sum().backward()
    assert torch.allclose(p_op.grad, p_ref.grad, rtol=1e-9, atol=1e-15)


def test_op_precisions():
    model = random_lpips("alex")
    pred, target = frames(2, 2, None, 32, 32)
    exact = ref.l1_lpips_reward(pred, target, 2, model.double())
    model.float()
    fp32 = ops.l1_lpips_reward(pred.float(), target.float(), 2, model, precision="fp32")
    assert fp32.dtype == torch.float32 and torch.allclose(fp32.double(), exact, rtol=1e-5)
    assert torch.equal(ops.l1_lpips_reward(pred.float(), target.float(), 2, model), fp32)  # auto on CPU: fp32
    bf16 = ops.l1_lpips_reward(pred.bfloat16(), target.bfloat16(), 2, model, precision="bf16")
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.double(), exact, atol=2e-2)
    fp64 = ops.l1_lpips_reward(pred.float(), target.float(), 2, model, precision="fp64")
    assert fp64.dtype == torch.float64


def test_backbone_sees_each_ground_truth_once(alex64):
    """B + B*G frames through the backbone, not 2*B*G."""
    B, G, F = 3, 4, 2
    seen = []

    class Counting:
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def tap_features(self, x):
            seen.append(x.shape[0])
            return self.model.tap_features(x)

    pred, target = frames(B, G, F, 31, 31)
    ops.l1_lpips_reward(pred, target, G, Counting(alex64), micro_batch=2 * (G + 1) * F)
    assert seen == [2 * (G + 1) * F, (G + 1) * F]
    assert sum(seen) == B * (G + 1) * F


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_exact_prediction_scores_zero_and_nan_is_kept_per_sample(alex64_device, backend):
    alex64 = alex64_device
    pred, target = frames(2, 3, None, 31, 31, device=DEVICE)
    pred[1] = target[0]  # an exact prediction
    pred[4, 2, 5, 5] = float("nan")  # a broken one
    reward = ops.l1_lpips_reward(pred, target, 3, alex64, backend=backend)
    assert reward[1].item() == 0.0
    assert reward[4].isnan() and torch.isfinite(reward[[0, 1, 2, 3, 5]]).all()


def test_op_empty_batch():
    reward = ops.l1_lpips_reward(torch.rand(0, 3, 32, 32), torch.rand(0, 3, 32, 32), 4, random_lpips("alex"))
    assert reward.shape == (0,)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(pred=torch.rand(4, 3, 32)), "pred"),
        (dict(pred=torch.rand(4, 4, 32, 32)), "pred"),
        (dict(target=torch.rand(3, 3, 32, 32)), "target"),
        (dict(target=torch.rand(2, 3, 32, 32).double()), None),  # dtype may differ: fine
        (dict(group_size=3), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(lpips=None), "lpips"),
        (dict(lpips=object()), "lpips"),
        (dict(l1_weight=-1.0), "l1_weight"),
        (dict(lpips_weight=float("nan")), "lpips_weight"),
        (dict(frame_reduction="sum"), "frame_reduction"),
        (dict(gamma=0.0), "gamma"),
        (dict(precision="fp16"), "precision"),
        (dict(micro_batch=0), "micro_batch"),
        (dict(pred=torch.rand(4, 3, 20, 20), target=torch.rand(2, 3, 20, 20)), "at least 31"),
        (dict(backend="cuda"), "cuda"),
    ],
)
def test_op_bad_arguments_name_themselves(change, match):
    args = dict(pred=torch.rand(4, 3, 32, 32), target=torch.rand(2, 3, 32, 32), group_size=2,
                lpips=random_lpips("alex"))
    args.update(change)
    if match is None:
        assert ops.l1_lpips_reward(**args).shape == (4,)
        return
    with pytest.raises(ValueError, match=match):
        ops.l1_lpips_reward(**args)


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_bf16_reward_near_fp32_and_no_host_sync():
    """At RLVR-World's frame size with LPIPS-VGG: bf16 channels_last backbone within 1e-2 of the fp32 way, the Triton
    path within float32 rounding of the reference backend, and no host synchronisation in the call."""
    try:
        model = LPIPS("vgg").cuda()
    except FileNotFoundError:
        model = random_lpips("vgg").cuda()
    B, G = 4, 16
    pred, target = frames(B, G, None, 256, 320, dtype=torch.float32)
    pred, target = pred.cuda(), target.cuda()
    fp32_way = ref.rlvr_world_reward(pred, target, G, model, autocast_dtype=None)
    fast = ops.l1_lpips_reward(pred, target, G, model)  # warm-up and compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast = ops.l1_lpips_reward(pred, target, G, model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (fast - fp32_way).abs().max().item() < 1e-2
    exact_triton = ops.l1_lpips_reward(pred, target, G, model, precision="fp32")
    exact_reference = ops.l1_lpips_reward(pred, target, G, model, precision="fp32", backend="reference")
    assert torch.allclose(exact_triton, exact_reference, rtol=1e-4, atol=1e-5)
    assert torch.allclose(exact_triton, fp32_way, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_gradient_matches_reference_backend():
    model = random_lpips("alex").cuda()
    pred, target = frames(2, 4, 2, 64, 80, dtype=torch.float32)
    grads = []
    for backend in BACKENDS:
        p = pred.cuda().requires_grad_()
        ops.l1_lpips_reward(p, target.cuda(), 4, model, precision="fp32", backend=backend).sum().backward()
        grads.append(p.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-7)
