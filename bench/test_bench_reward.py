"""The video rewards, -(L1 + LPIPS-VGG) of RLVR-World and frame_reward's pixel metrics: 128 prompts x G=16
predictions at 256x320 on a GPU (2 x 16 at 64x64 on CPU unless RLVRW_BENCH_FULL=1), forward only (rewards carry no
gradient in GRPO). Groups ``frame_reward_<metric>`` time the pixel rewards (see ``test_frame_reward_pixels``).

Group ``l1_lpips_reward``:

* ``rlvrw``: ``ops.l1_lpips_reward`` with its defaults: the backbone on B + B*G frames (each ground truth once per
  group), bf16 channels_last on the GPU (fp32 on CPU), the fused scale+L1 pass and the fused LPIPS tail kernel.
* ``eager``: the way the reference code does it (``rlvrw.reference.reward.rlvr_world_reward``): the ground truth
  repeated for every sample, LPIPS in micro-batches of 8 under bf16 autocast (no autocast on CPU, where bf16
  convolutions are slower than fp32), and a separate L1.

Every impl records ``max_abs_err``, its largest reward difference from the fp32 way (eager without autocast, TF32
off), and the backbone work by construction: ``backbone_images`` and ``backbone_gflops`` (FLOPs of the backbone
convolutions, counted on meta tensors). Group ``lpips_tail`` (GPU only) times the LPIPS tail of one chunk's VGG taps,
the fused Triton kernel against the same math in eager PyTorch, and reports its bandwidth over the feature maps'
bytes (each read once).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rlvrw.ops as ops
from rlvrw.models import LPIPS
from rlvrw.ops.reward import reward_weights
from rlvrw.reference import reward as reference

NET = "vgg"
FULL = dict(prompts=128, group=16, height=256, width=320)
CPU = dict(prompts=2, group=16, height=64, width=64)
EAGER_MICRO_BATCH = 8

_CACHE: dict = {}


def _problem(env) -> dict:
    """Frames, the LPIPS network and the fp32 rewards, made once per session."""
    if "problem" in _CACHE:
        return _CACHE["problem"]
    dims = FULL if env.full else CPU
    B, G, H, W = dims["prompts"], dims["group"], dims["height"], dims["width"]
    try:
        model = LPIPS(NET)
        weights = "real"
    except FileNotFoundError:  # the timing does not depend on the weights' values
        torch.manual_seed(0)
        model = LPIPS(NET, random_weights=True)
        weights = "random (real LPIPS-vgg weights not found; run `rlvrw weights lpips`)"
    model = model.to(env.device)
    gen = torch.Generator(device=env.device)
    gen.manual_seed(0)
    target = torch.rand(B, 3, H, W, generator=gen, device=env.device)
    noise = 0.1 * torch.randn(B * G, 3, H, W, generator=gen, device=env.device)
    pred = (target.repeat_interleave(G, dim=0) + noise).clamp_(0, 1)
    del noise
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the fp32 answer, not TF32's
    try:
        with torch.no_grad():
            fp32 = reference.rlvr_world_reward(pred, target, G, model, micro_batch=64, autocast_dtype=None)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    shape = f"{B}x{G} {H}x{W} LPIPS-{NET}" + ("" if env.full else " (CPU-scaled)")
    _CACHE["problem"] = dict(B=B, G=G, H=H, W=W, model=model, pred=pred, target=target, fp32=fp32, shape=shape,
                             weights=weights, image_gflops=_backbone_gflops_per_image(H, W))
    return _CACHE["problem"]


def _backbone_gflops_per_image(h: int, w: int) -> float:
    model = LPIPS(NET, random_weights=True).to("meta")
    with FlopCounterMode(display=False) as counter:
        model.tap_features(torch.empty(1, 3, h, w, device="meta"))
    return counter.get_total_flops() / 1e9


@pytest.mark.parametrize("impl", ("rlvrw", "eager"))
def test_l1_lpips_reward(bench, bench_env, impl):
    env = bench_env
    p = _problem(env)
    B, G, model = p["B"], p["G"], p["model"]
    if impl == "eager":
        autocast = torch.bfloat16 if env.is_cuda else None
        images = 2 * B * G

        def reward(s):
            return reference.rlvr_world_reward(s["pred"], s["target"], G, model, micro_batch=EAGER_MICRO_BATCH,
                                               autocast_dtype=autocast)

    else:
        images = B * (G + 1)

        def reward(s):
            return ops.l1_lpips_reward(s["pred"], s["target"], G, model)

    with torch.no_grad():
        err = (reward(p) - p["fp32"]).abs().max().item()

    def step(s):
        with torch.no_grad():
            reward(s)

    bench.run(
        op="l1_lpips_reward", impl=impl, shape=p["shape"],
        make_state=lambda: {"pred": p["pred"], "target": p["target"]}, step=step,
        extra={
            "passes": "fwd",
            "max_abs_err": err,
            "backbone_images": images,
            "backbone_gflops": images * p["image_gflops"],
            "flops_ratio_eager_over_this": 2 * B * G / images,
            "weights": p["weights"],
        },
    )


@pytest.mark.parametrize("impl", ("rlvrw-triton", "eager"))
def test_lpips_tail(bench, bench_env, impl):
    """The LPIPS tail of one chunk of 7 groups (7 ground truths + 112 predictions) over VGG's five taps, bf16
    channels_last as the reward's backbone makes them. Bytes: every feature map read once."""
    env = bench_env
    if not env.is_cuda:
        pytest.skip("the tail kernel is timed on a GPU (on CPU it runs in Triton's interpreter)")
    p = _problem(env)
    G, model = p["G"], p["model"]
    groups = 7
    with torch.no_grad():
        frames = torch.cat([p["target"][:groups], p["pred"][: groups * G]])
        x = model.scale_input(2 * frames - 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        taps = model.tap_features(x)
    weights = list(model.lin_weights)
    bytes_moved = sum(t.numel() * t.element_size() for t in taps)

    if impl == "rlvrw-triton":
        from rlvrw.kernels import lpips_tail

        def step(s):
            for tap, w in zip(taps, weights):
                lpips_tail.lpips_tail_forward(tap[groups:], tap[:groups], w, G, 1, reference.NORM_EPS)

    else:

        def step(s):
            for tap, w in zip(taps, weights):
                reference.lpips_layer_distance(tap[groups:], tap[:groups], w, G, 1)

    bench.run(
        op="lpips_tail", impl=impl, shape=f"{groups}x{G} {p['H']}x{p['W']} LPIPS-{NET} taps, bf16 channels_last",
        make_state=dict, step=step, bytes_moved=bytes_moved, extra={"passes": "fwd"},
    )


# ---------------------------------------------------------------------------------------------------------------------
# pixel rewards (frame_reward's MAE, MSE, PSNR, SSIM)
# ---------------------------------------------------------------------------------------------------------------------

PIXEL_METRICS = ("mae", "ssim", "mae+mse+psnr+ssim")


@pytest.mark.parametrize("metric", PIXEL_METRICS)
@pytest.mark.parametrize("impl", ("rlvrw", "eager"))
def test_frame_reward_pixels(bench, bench_env, impl, metric):
    """Group ``frame_reward_<metric>``: ``ops.frame_reward`` (one Triton kernel for every per-frame pixel term, the
    ground truth's SSIM moments once per group) against the plain way (``reference.frame_reward``: the ground truth
    repeated for every sample, the SSIM map materialized). Bytes: the predictions and ground truths read once."""
    env = bench_env
    p = _problem(env)
    G = p["G"]
    weights = reward_weights(metric)
    if impl == "eager":

        def reward(s):
            return reference.frame_reward(s["pred"], s["target"], G, weights)[0]

    else:

        def reward(s):
            return ops.frame_reward(s["pred"], s["target"], G, metric)

    with torch.no_grad():
        exact = reference.frame_reward(p["pred"].double(), p["target"].double(), G, weights)[0]
        err = (reward(p).double() - exact).abs().max().item()

    def step(s):
        with torch.no_grad():
            reward(s)

    bytes_moved = (p["pred"].numel() + p["target"].numel()) * p["pred"].element_size()
    bench.run(
        op=f"frame_reward_{metric}", impl=impl, shape=p["shape"].replace(f" LPIPS-{NET}", ""),
        make_state=lambda: {"pred": p["pred"], "target": p["target"]}, step=step, bytes_moved=bytes_moved,
        extra={"passes": "fwd", "max_abs_err": err},
    )
