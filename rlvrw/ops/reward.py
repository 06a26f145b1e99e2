"""The rewards of a video world model: any weighted sum of MAE, MSE, PSNR, SSIM and LPIPS of each predicted frame
against its ground truth (``frame_reward``; higher is better), and RLVR-World's ``-(l1_weight * L1 + lpips_weight *
LPIPS)`` (``l1_lpips_reward``, its ``"l1+lpips"`` case). Every ground truth is read once per group.

The specs are ``rlvrw.reference.reward.frame_reward`` and ``l1_lpips_reward`` (the ground truth repeated for every
prediction). Pixel terms (MAE, MSE, PSNR, SSIM): SSIM's local moments come from the separable Gaussian window (two
1-D convolutions), the ground truth's mean and second moment once per group; then one Triton kernel
(``kernels/frame_stats.py``) reads each prediction, its ground truth and their moments once and writes the
prediction's MAE, MSE and mean SSIM (PSNR follows from the MSE); on CPU the same steps in plain PyTorch. LPIPS:

* The backbone runs on B + B*G images, not 2*B*G: each chunk of whole groups is laid out
  ``[k*F ground truths ; k*G*F predictions]`` and every prediction is compared with the features of its group's
  ground truth (``kernels/lpips_tail.py`` has the layout).
* On the GPU (``triton``): one kernel scales the [0, 1] frames into the backbone's input (bf16, channels_last) and
  sums the L1 term on the way; per tap, one kernel reads the prediction's and the ground truth's feature maps once
  and accumulates the normalized, weighted squared difference into the per-sample score. On CPU (``reference``):
  the same layout and sharing in plain PyTorch (broadcasting over the group instead of repeating).
* The backbone runs in micro-batches of whole groups; nothing synchronises with the host.

``lpips`` is duck-typed (``rlvrw.ops`` does not import ``rlvrw.models``): it needs ``tap_features(x) -> [tensor]``
(the backbone's taps for a scaled input), ``input_shift`` and ``input_scale`` (3,), ``lin_weights`` (one (C,) tensor
per tap) and ``min_input_size``, as ``rlvrw.models.LPIPS`` has.
"""

from __future__ import annotations

import math

import torch

from rlvrw import checks
from rlvrw.ops import _backend
from rlvrw.ops.frame_stats import PIXEL_STATS, pixel_stats
from rlvrw.reference import reward as reference
from rlvrw.reference.logprobs import compute_dtype

PRECISIONS = ("auto", "bf16", "fp32", "fp64")
_BACKBONE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_LPIPS_ATTRIBUTES = ("tap_features", "input_shift", "input_scale", "lin_weights", "min_input_size")
# Peak activation bytes per pixel of one image, per byte of the backbone dtype, for VGG16 without autograd (the live
# layer pair plus the kept taps is about 250 channels; twice that for headroom). With autograd every layer is kept.
_ACTIVATION_BYTES_PER_PIXEL = 512
_AUTOGRAD_FACTOR = 4


def _kernels():
    from rlvrw.kernels import lpips_tail

    return lpips_tail


class _ScaleL1Function(torch.autograd.Function):
    """The Triton pass that writes the backbone input in the chunk layout and the L1 term; gradients reach pred."""

    @staticmethod
    def forward(ctx, pred, target, shift, scale, group_size, num_frames, groups_per_chunk, x_dtype, channels_last,
                acc_dtype):
        x, l1_partials = _kernels().scale_l1(
            pred, target, shift, scale, group_size, num_frames, groups_per_chunk, x_dtype, channels_last, acc_dtype
        )
        ctx.save_for_backward(pred, target, scale)
        ctx.layout = (group_size, num_frames, groups_per_chunk)
        return x, l1_partials.sum(dim=1)

    @staticmethod
    def backward(ctx, grad_x, grad_l1):
        pred, target, scale = ctx.saved_tensors
        group_size, num_frames, groups_per_chunk = ctx.layout
        acc_dtype = compute_dtype(pred.dtype)
        grad = torch.zeros(pred.shape, dtype=acc_dtype, device=pred.device)
        if grad_x is not None:
            rows = chunk_rows(target.shape[0] // num_frames, group_size, num_frames, groups_per_chunk)
            grad_pred_rows = torch.cat([grad_x[r + n_t : r + n_t + n_p] for r, n_t, n_p in rows])
            grad += grad_pred_rows.to(acc_dtype) * (2.0 / scale.to(acc_dtype)).view(1, 3, 1, 1)
        if grad_l1 is not None:
            _, _, h, w = pred.shape
            diff = pred.to(acc_dtype).unflatten(0, (-1, group_size, num_frames))
            diff = diff - target.to(acc_dtype).unflatten(0, (-1, 1, num_frames))
            grad += diff.sign().flatten(0, 2) * (grad_l1.to(acc_dtype) / (3 * h * w)).view(-1, 1, 1, 1)
        return grad.to(pred.dtype), None, None, None, None, None, None, None, None, None


class _LPIPSTailFunction(torch.autograd.Function):
    """One tap's LPIPS distance per predicted frame, by the fused Triton kernel; gradients reach the prediction's
    features (the ground truth is a constant)."""

    @staticmethod
    def forward(ctx, pred_feat, target_feat, weight, group_size, num_frames):
        partials = _kernels().lpips_tail_forward(
            pred_feat, target_feat, weight, group_size, num_frames, reference.NORM_EPS
        )
        ctx.save_for_backward(pred_feat, target_feat, weight)
        ctx.layout = (group_size, num_frames)
        return partials.sum(dim=1)

    @staticmethod
    def backward(ctx, grad_dist):
        pred_feat, target_feat, weight = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _kernels().lpips_tail_backward(
                pred_feat, target_feat, weight, grad_dist, *ctx.layout, reference.NORM_EPS
            )
        return grad, None, None, None, None


def chunk_rows(num_groups: int, group_size: int, num_frames: int, groups_per_chunk: int) -> list[tuple[int, int, int]]:
    """(first row, ground-truth rows, prediction rows) of every chunk of the backbone's input layout."""
    rows, start = [], 0
    for b0 in range(0, num_groups, groups_per_chunk):
        k = min(groups_per_chunk, num_groups - b0)
        rows.append((start, k * num_frames, k * group_size * num_frames))
        start += k * (group_size + 1) * num_frames
    return rows


def _scaled_input_reference(pred, target, lpips, group_size, num_frames, groups_per_chunk, x_dtype, acc_dtype):
    """Plain-PyTorch counterpart of ``_ScaleL1Function``: (x in the chunk layout, L1 per predicted frame)."""
    p, t = pred.to(acc_dtype), target.to(acc_dtype)
    shift = lpips.input_shift.to(acc_dtype).view(1, 3, 1, 1)
    scale = lpips.input_scale.to(acc_dtype).view(1, 3, 1, 1)
    p_scaled, t_scaled = ((2 * p - 1) - shift) / scale, ((2 * t - 1) - shift) / scale
    pieces, t_row, p_row = [], 0, 0
    for _, n_targets, n_preds in chunk_rows(target.shape[0] // num_frames, group_size, num_frames, groups_per_chunk):
        pieces += [t_scaled[t_row : t_row + n_targets], p_scaled[p_row : p_row + n_preds]]
        t_row, p_row = t_row + n_targets, p_row + n_preds
    diff = p.unflatten(0, (-1, group_size, num_frames)) - t.unflatten(0, (-1, 1, num_frames))
    return torch.cat(pieces).to(x_dtype), diff.abs().mean(dim=(3, 4, 5)).reshape(-1)


def _default_micro_batch(device: torch.device, h: int, w: int, dtype: torch.dtype, autograd: bool) -> int:
    """Images per backbone call: about 1/8 of the GPU's memory (1 GiB on CPU) by the activation estimate above."""
    budget = torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else 1 << 30
    per_image = h * w * _ACTIVATION_BYTES_PER_PIXEL * dtype.itemsize * (_AUTOGRAD_FACTOR if autograd else 1)
    return max(1, budget // per_image)


def _check_lpips(lpips, device: torch.device) -> None:
    missing = [name for name in _LPIPS_ATTRIBUTES if not hasattr(lpips, name)]
    if missing:
        raise ValueError(
            f"lpips must be an LPIPS network such as rlvrw.models.LPIPS(net='vgg'); got {type(lpips).__name__} "
            f"without {missing}"
        )
    if lpips.input_shift.device != device:
        raise ValueError(f"lpips is on {lpips.input_shift.device} but pred is on {device}: move it with lpips.to()")


def _check_weight(name: str, value) -> float:
    return checks.number(name, value, low=0)


def _check_frames(pred, target, group_size) -> tuple[int, int]:
    """(B, F) after checking the shapes of pred and target."""
    checks.tensor("pred", pred, dims=(4, 5))
    checks.tensor("target", target, dims=(pred.dim(),))
    checks.integer("group_size", group_size)
    layout = "(B*G, 3, H, W)" if pred.dim() == 4 else "(B*G, F, 3, H, W)"
    if pred.shape[-3] != 3:
        raise ValueError(f"pred must be {layout} RGB frames, got shape {tuple(pred.shape)}")
    if pred.shape[0] % group_size:
        raise ValueError(f"group_size ({group_size}) must divide pred.shape[0] ({pred.shape[0]})")
    num_groups = pred.shape[0] // group_size
    checks.shape("target", target, (num_groups, *pred.shape[1:]), f"one ground truth per group of pred {layout}")
    return num_groups, 1 if pred.dim() == 4 else pred.shape[1]


REWARD_METRICS = (*reference.METRICS, "l1+lpips")  # the names frame_reward takes; sums like "mae+0.5*lpips" too
METRIC_ALIASES = {"l1": "mae"}


def reward_weights(metric) -> dict[str, float]:
    """``{metric name: weight}`` of a reward: a name of ``REWARD_METRICS``, a sum of names with optional weights
    (``"l1+lpips"``, ``"mae+0.5*lpips"``; ``l1`` means ``mae``), or such a dict. ValueError names the choices."""
    if isinstance(metric, str):
        terms = {}
        for part in metric.replace(" ", "").split("+"):
            weight, star, name = part.rpartition("*")
            try:
                value = float(weight) if star else 1.0
            except ValueError:
                value = float("nan")
            name = METRIC_ALIASES.get(name, name)
            if name not in reference.METRICS or not math.isfinite(value):
                raise ValueError(f"metric must be one of {list(REWARD_METRICS)}, a sum of them with optional weights "
                                 f"('mae+0.5*lpips'), or a dict of weights; got {metric!r}")
            terms[name] = terms.get(name, 0.0) + value
        metric = terms
    if not isinstance(metric, dict) or not metric:
        raise ValueError(f"metric must be one of {list(REWARD_METRICS)}, a sum of them, or a non-empty dict of "
                         f"weights; got {metric!r}")
    weights = {}
    for name, weight in metric.items():
        canonical = METRIC_ALIASES.get(name, name)
        if canonical not in reference.METRICS:
            raise ValueError(f"metric: unknown metric {name!r}; choices: {list(reference.METRICS)} (and 'l1')")
        weights[canonical] = weights.get(canonical, 0.0) + _check_weight(f"metric[{name!r}]", weight)
    return weights


def frame_reward(
    pred: torch.Tensor,
    target: torch.Tensor,
    group_size: int,
    metric,
    lpips=None,
    frame_reduction: str = "mean",
    gamma: float = 0.9,
    *,
    return_terms: bool = False,
    psnr_cap_db: float = reference.PSNR_CAP_DB,
    precision: str = "auto",
    micro_batch: int | None = None,
    backend: str | None = None,
):
    """The verifiable reward of each predicted frame: ``sum_m w_m * (+-) metric_m``, higher is better.

    metric: ``"mae"``, ``"mse"``, ``"psnr"``, ``"ssim"``, ``"lpips"``, ``"l1+lpips"`` (``l1`` is ``mae``), a
    weighted sum (``"mae+0.5*lpips"``) or a dict ``{name: weight}`` (weights >= 0). Losses enter negated (``-mae``,
    ``-mse``, ``-lpips``), PSNR and SSIM as they are; each term per frame equals ``rlvrw.eval.metrics`` (PSNR capped
    at ``psnr_cap_db``, so an exact prediction scores a finite reward).

    pred (B*G, 3, H, W) in [0, 1], laid out group by group (the G samples of prompt b are rows b*G ... b*G+G-1);
    target (B, 3, H, W), the ground truth of each group. Multi-frame: pred (B*G, F, 3, H, W) with target
    (B, F, 3, H, W) gives per-frame rewards reduced over frames by ``frame_reduction``: ``"mean"`` (the multi-step
    reward), ``"last"``, or ``"discounted"`` (``gamma^f``, normalized to sum to 1). Returns (B*G,) on pred's device,
    float32 (float64 for float64 input or ``precision="fp64"``), without a host sync; with ``return_terms``,
    ``(reward, {name: (B*G,)})``: each metric of the reward per sample, reduced over frames the same way, in its own
    units (so nothing has to invert the reward to log its parts). Differentiable in pred; the target is a constant.

    lpips: an LPIPS network (``rlvrw.models.LPIPS(net="vgg")``) on pred's device, needed when the reward has LPIPS.
    precision, micro_batch: of the LPIPS backbone, as in ``l1_lpips_reward``. SSIM needs frames of at least 11 x 11.
    Values outside [0, 1] are not checked (that would sync); NaN in a prediction gives a NaN reward for that sample.
    """
    num_groups, num_frames = _check_frames(pred, target, group_size)
    device = checks.same_device(pred=pred, target=target)
    weights = reward_weights(metric)
    with_lpips = "lpips" in weights
    if with_lpips:
        _check_lpips(lpips, device)
    checks.choice("frame_reduction", frame_reduction, reference.FRAME_REDUCTIONS)
    if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    checks.positive("psnr_cap_db", psnr_cap_db)
    checks.choice("precision", precision, PRECISIONS)
    h, w = pred.shape[-2:]
    if with_lpips and min(h, w) < lpips.min_input_size:
        raise ValueError(
            f"pred frames are {h}x{w}; this LPIPS network needs at least {lpips.min_input_size}x{lpips.min_input_size}"
        )
    if "ssim" in weights and min(h, w) < reference.SSIM_WINDOW:
        raise ValueError(f"pred frames are {h}x{w}; the SSIM reward's {reference.SSIM_WINDOW}-tap window needs at "
                         "least that size")
    if micro_batch is not None:
        checks.integer("micro_batch", micro_batch)
    name = _backend.resolve("frame_reward", device, backend)

    if precision == "auto":
        precision = "fp64" if pred.dtype == torch.float64 else "bf16" if device.type == "cuda" else "fp32"
    acc_dtype = torch.float64 if precision == "fp64" else torch.float32
    if num_groups == 0:
        empty = torch.zeros(0, dtype=acc_dtype, device=device)
        return (empty, {m: empty for m in weights}) if return_terms else empty

    pred_frames = pred.reshape(-1, 3, h, w)
    target_frames = target.detach().reshape(-1, 3, h, w)
    values = {}
    if with_lpips:
        values["mae"], values["lpips"] = _l1_and_lpips(pred_frames, target_frames, lpips, group_size, num_frames,
                                                       precision, acc_dtype, micro_batch, name)
    pixel = [m for m in weights if m in reference.PIXEL_METRICS and m not in values]
    if pixel:
        stats = pixel_stats(pred_frames.to(acc_dtype) if pred.dtype != acc_dtype else pred_frames,
                            target_frames.to(acc_dtype), group_size, num_frames, "ssim" in pixel, name)
        values.update({stat: stats[:, i] for i, stat in enumerate(PIXEL_STATS) if stat in pixel})
        if "psnr" in pixel:
            values["psnr"] = reference.psnr_from_mse(stats[:, PIXEL_STATS.index("mse")], psnr_cap_db)
    per_frame = sum(weight * (values[m] if m in reference.HIGHER_IS_BETTER else -values[m])
                    for m, weight in weights.items())
    reward = _reduce_frames(per_frame, num_frames, frame_reduction, gamma, acc_dtype, device)
    if not return_terms:
        return reward
    return reward, {m: _reduce_frames(values[m], num_frames, frame_reduction, gamma, acc_dtype, device)
                    for m in weights}


def _reduce_frames(per_frame, num_frames, frame_reduction, gamma, dtype, device) -> torch.Tensor:
    per_frame = per_frame.to(dtype)
    if num_frames == 1:
        return per_frame
    weights = reference.frame_weights(num_frames, frame_reduction, gamma, dtype, device)
    return (per_frame.view(-1, num_frames) * weights).sum(dim=1)


def _l1_and_lpips(pred_frames, target_frames, lpips, group_size, num_frames, precision, acc_dtype, micro_batch,
                  name) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, LPIPS distance) per predicted frame, the backbone run on each ground truth once per group."""
    h, w = pred_frames.shape[-2:]
    device = pred_frames.device
    num_groups = target_frames.shape[0] // num_frames
    x_dtype = _BACKBONE_DTYPES[precision]
    autograd = torch.is_grad_enabled() and pred_frames.requires_grad
    if micro_batch is None:
        micro_batch = _default_micro_batch(device, h, w, x_dtype, autograd)
    groups_per_chunk = max(1, micro_batch // ((group_size + 1) * num_frames))
    if name == "reference":
        x, l1 = _scaled_input_reference(
            pred_frames, target_frames, lpips, group_size, num_frames, groups_per_chunk, x_dtype, acc_dtype
        )
    else:
        x, l1 = _ScaleL1Function.apply(
            pred_frames, target_frames, lpips.input_shift, lpips.input_scale, group_size, num_frames,
            groups_per_chunk, x_dtype, device.type == "cuda", acc_dtype,
        )
    distances = []
    for start, n_targets, n_preds in chunk_rows(num_groups, group_size, num_frames, groups_per_chunk):
        taps = lpips.tap_features(x[start : start + n_targets + n_preds])
        chunk_distance = 0
        for tap, weight in zip(taps, lpips.lin_weights):
            target_feat, pred_feat = tap[:n_targets], tap[n_targets:]
            if name == "reference":
                chunk_distance = chunk_distance + reference.lpips_layer_distance(
                    pred_feat, target_feat, weight, group_size, num_frames
                )
            else:
                chunk_distance = chunk_distance + _LPIPSTailFunction.apply(
                    pred_feat, target_feat, weight, group_size, num_frames
                )
        distances.append(chunk_distance)
    return l1.to(acc_dtype), torch.cat(distances).to(acc_dtype)


def l1_lpips_reward(
    pred: torch.Tensor,
    target: torch.Tensor,
    group_size: int = 16,
    lpips=None,
    l1_weight: float = 1.0,
    lpips_weight: float = 1.0,
    *,
    frame_reduction: str = "mean",
    gamma: float = 0.9,
    return_terms: bool = False,
    precision: str = "auto",
    micro_batch: int | None = None,
    backend: str | None = None,
):
    """``-(l1_weight * mean|pred - target| + lpips_weight * LPIPS(2 * pred - 1, 2 * target - 1))`` per sample: RLVR-
    World's video reward, ``frame_reward``'s ``"l1+lpips"`` case (same shapes and options; ``lpips`` required). The
    L1 term comes from the pass that scales the frames into the backbone's input, at no extra read.
    return_terms: also return ``{"mae": (B*G,), "lpips": (B*G,)}``, the unweighted terms (as ``frame_reward``).
    precision: the backbone's dtype. ``"auto"``: bf16 (channels_last) on the GPU, fp32 on CPU, fp64 for fp64 input;
    ``"fp32"`` for evaluation-grade numbers. The LPIPS tail and the L1 term are always float32 or better.
    micro_batch: images per backbone call (rounded to whole groups, at least one group); default from the device's
    memory and the frame size.
    """
    _check_frames(pred, target, group_size)
    _check_lpips(lpips, checks.same_device(pred=pred, target=target))
    weights = {"mae": _check_weight("l1_weight", l1_weight), "lpips": _check_weight("lpips_weight", lpips_weight)}
    return frame_reward(pred, target, group_size, weights, lpips, frame_reduction, gamma, return_terms=return_terms,
                        precision=precision, micro_batch=micro_batch, backend=backend)
