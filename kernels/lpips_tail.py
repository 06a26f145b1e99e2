"""Triton kernels of the L1 + LPIPS reward (``rlvrw.ops.l1_lpips_reward``); the spec is ``rlvrw.reference.reward``.

The reward runs the LPIPS backbone on the B ground truths and the B*G predictions together, in chunks of whole groups
laid out ``[k*F ground-truth frames ; k*G*F predicted frames]`` (k groups per chunk, the last chunk maybe fewer;
predictions in the caller's (b, g, f) order, ground truths in (b, f) order). Two kernels surround the backbone:

* ``scale_l1``: one pass over the [0, 1] frames that writes the backbone input in that chunk layout, scaled as lpips
  scales it (``((2 * v - 1) - shift_c) / scale_c``, in the backbone's dtype and memory format), and, for every
  predicted frame, the mean of ``|pred - target|`` against its ground truth: the L1 term costs no extra pass.
* ``lpips_tail_forward``: for one tap of one chunk, per predicted frame and per pixel, the unit-length feature vectors
  of the prediction and of its (shared) ground truth, their squared difference weighted by the 1x1 linear weights,
  summed over pixels and divided by their number. Each feature map is read once: the whole channel vector of a block
  of pixels sits in registers, so the norm and the difference come from the same load.
  ``lpips_tail_backward`` gives d(distance)/d(prediction features) for training losses (the ground truth is a
  constant).

Both forward kernels split a row's pixels over ``n_split`` programs, each writing its own partial sum (already divided
by the element count), and the caller adds the partials: the sums are deterministic (no atomics). Unit length is
``f / sqrt(sum_c f_c^2 + eps^2)`` (epsilon inside the root; see ``rlvrw.reference.reward``). Math is float32, float64
for float64 features. Nothing here validates arguments (``rlvrw.ops`` does) or synchronises with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _programs_wanted(device: torch.device) -> int:
    """About how many programs keep the device busy (on CPU, under the interpreter, fewer is faster)."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _split(rows: int, blocks_per_row: int, device: torch.device) -> int:
    return max(1, min(blocks_per_row, triton.cdiv(_programs_wanted(device), max(rows, 1))))


# ---------------------------------------------------------------------------------------------------------------------
# scaled backbone input + L1
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _scale_frame(
    src, s_c, s_h, s_w, ref, r_c, r_h, r_w, dst, d_c, d_h, d_w, shift_ptr, scale_ptr, acc_ptr,
    H, W, split, n_split, WITH_L1: tl.constexpr, BLOCK: tl.constexpr,
):
    """Write the scaled frame at ``src`` to ``dst``; with WITH_L1, return sum |src - ref| over this split's pixels."""
    cdt = acc_ptr.dtype.element_ty
    hw = H * W
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=cdt)
    for start in range(split * BLOCK, hw, n_split * BLOCK):
        pix = start + offs
        inside = pix < hw
        y = pix // W
        x = pix - y * W
        # the three channels of a pixel block one after the other: channels_last writes fill whole cache lines
        for c in tl.static_range(3):
            shift = tl.load(shift_ptr + c).to(cdt)
            scale = tl.load(scale_ptr + c).to(cdt)
            v = tl.load(src + c * s_c + y * s_h + x * s_w, mask=inside, other=0.0).to(cdt)
            # lpips' order of operations: 2 * v - 1, then the scaling layer
            scaled = ((2.0 * v - 1.0) - shift) / scale
            tl.store(dst + c * d_c + y * d_h + x * d_w, scaled.to(dst.dtype.element_ty), mask=inside)
            if WITH_L1:
                r = tl.load(ref + c * r_c + y * r_h + x * r_w, mask=inside, other=0.0).to(cdt)
                acc += tl.abs(v - r)
    return tl.sum(acc, axis=0)


@triton.jit
def _scale_l1_kernel(
    pred_ptr, target_ptr, x_ptr, l1_ptr, shift_ptr, scale_ptr,
    B, G, F, K, H, W, n_split, inv_numel: tl.float64,
    sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w, sx_n, sx_c, sx_h, sx_w,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row of the chunk layout
    split = tl.program_id(1)
    chunk_rows = K * (G + 1) * F
    chunk = row // chunk_rows
    local = row - chunk * chunk_rows
    n_targets = tl.minimum(K, B - chunk * K) * F  # the last chunk may hold fewer groups
    dst = x_ptr + row * sx_n
    if local < n_targets:
        src = target_ptr + (chunk * K * F + local) * st_n
        _scale_frame(
            src, st_c, st_h, st_w, src, st_c, st_h, st_w, dst, sx_c, sx_h, sx_w, shift_ptr, scale_ptr, l1_ptr,
            H, W, split, n_split, False, BLOCK,
        )
    else:
        p = chunk * K * G * F + (local - n_targets)
        t = (p // (G * F)) * F + p % F
        l1 = _scale_frame(
            pred_ptr + p * sp_n, sp_c, sp_h, sp_w, target_ptr + t * st_n, st_c, st_h, st_w, dst, sx_c, sx_h, sx_w,
            shift_ptr, scale_ptr, l1_ptr, H, W, split, n_split, True, BLOCK,
        )
        tl.store(l1_ptr + p * n_split + split, l1 * tl.full((), inv_numel, l1.dtype))


def scale_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    num_frames: int,
    groups_per_chunk: int,
    x_dtype: torch.dtype,
    channels_last: bool,
    acc_dtype: torch.dtype,
    *,
    n_split: int | None = None,
    out: torch.Tensor | None = None,
    l1_out: torch.Tensor | None = None,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred (B*G*F, 3, H, W) and target (B*F, 3, H, W) in [0, 1] -> (x, l1_partials).

    x (B*(G+1)*F, 3, H, W) in ``x_dtype`` (channels_last when asked) in the chunk layout; l1_partials (B*G*F, n_split)
    in ``acc_dtype`` summing to mean |pred - target| per predicted frame.
    """
    n_pred, _, h, w = pred.shape
    n_rows = n_pred + target.shape[0]
    num_groups = target.shape[0] // num_frames
    if n_split is None:
        n_split = _split(n_rows, triton.cdiv(h * w, block), pred.device)
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((n_rows, 3, h, w), dtype=x_dtype, device=pred.device, memory_format=fmt)
    if l1_out is None:
        l1_out = torch.empty((n_pred, n_split), dtype=acc_dtype, device=pred.device)
    if n_rows:
        _scale_l1_kernel[(n_rows, n_split)](
            pred, target, out, l1_out, shift, scale,
            num_groups, group_size, num_frames, groups_per_chunk, h, w, n_split, 1.0 / (3 * h * w),
            *pred.stride(), *target.stride(), *out.stride(),
            BLOCK=block,
        )
    return out, l1_out


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS tail of one tap
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _unit_length_tiles(pred_ptr, target_ptr, p, t, pix, pix_ok, ch, C, W, eps2, sp_n, sp_c, sp_h, sp_w,
                       st_n, st_c, st_h, st_w):
    """Tiles (pixels, channels) of the prediction's features in eps2's dtype, their reciprocal norms, and the
    unit-length target. Pixels outside the map read as zero vectors, which contribute exactly 0 to the distance and
    its gradient."""
    cdt = eps2.dtype
    y = pix // W
    x = pix - y * W
    inside = pix_ok[:, None] & (ch < C)[None, :]
    a = tl.load(pred_ptr + p * sp_n + (y * sp_h + x * sp_w)[:, None] + ch[None, :] * sp_c, mask=inside, other=0.0)
    b = tl.load(target_ptr + t * st_n + (y * st_h + x * st_w)[:, None] + ch[None, :] * st_c, mask=inside, other=0.0)
    a = a.to(cdt)
    b = b.to(cdt)
    inv_a = 1.0 / tl.sqrt(tl.sum(a * a, axis=1) + eps2)
    inv_b = 1.0 / tl.sqrt(tl.sum(b * b, axis=1) + eps2)
    return a, inv_a, b * inv_b[:, None]


@triton.jit
def _lpips_tail_fwd_kernel(
    pred_ptr, target_ptr, w_ptr, out_ptr,
    C, H, W, G, F, n_split, inv_hw: tl.float64, eps2: tl.float64,
    sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)  # predicted frame, (b, g, f) order
    split = tl.program_id(1)
    cdt = out_ptr.dtype.element_ty
    t = (p // (G * F)) * F + p % F  # its ground truth, (b, f) order
    ch = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + ch, mask=ch < C, other=0.0).to(cdt)
    eps2_c = tl.full((), eps2, cdt)
    hw = H * W
    acc = tl.zeros((BLOCK_P,), dtype=cdt)
    for start in range(split * BLOCK_P, hw, n_split * BLOCK_P):
        pix = start + tl.arange(0, BLOCK_P)
        a, inv_a, unit_b = _unit_length_tiles(
            pred_ptr, target_ptr, p, t, pix, pix < hw, ch, C, W, eps2_c, sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w
        )
        d = a * inv_a[:, None] - unit_b
        acc += tl.sum(d * d * w[None, :], axis=1)
    tl.store(out_ptr + p * n_split + split, tl.sum(acc, axis=0) * tl.full((), inv_hw, cdt))


@triton.jit
def _lpips_tail_bwd_kernel(
    pred_ptr, target_ptr, w_ptr, grad_dist_ptr, grad_ptr,
    C, H, W, G, F, inv_hw: tl.float64, eps2: tl.float64,
    sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w, sg_n, sg_c, sg_h, sg_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cdt = grad_dist_ptr.dtype.element_ty
    t = (p // (G * F)) * F + p % F
    ch = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + ch, mask=ch < C, other=0.0).to(cdt)
    eps2_c = tl.full((), eps2, cdt)
    hw = H * W
    pix = block * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = pix < hw
    a, inv_a, unit_b = _unit_length_tiles(
        pred_ptr, target_ptr, p, t, pix, pix_ok, ch, C, W, eps2_c, sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w
    )
    unit_a = a * inv_a[:, None]
    e = w[None, :] * (unit_a - unit_b)
    # d/da_c of sum_k w_k (u_k - v_k)^2 with u = a / sqrt(|a|^2 + eps^2):  2 / |a| * (e_c - u_c * sum_k e_k u_k)
    g = tl.load(grad_dist_ptr + p).to(cdt) * tl.full((), inv_hw, cdt)
    grad = (2.0 * g) * inv_a[:, None] * (e - unit_a * tl.sum(e * unit_a, axis=1)[:, None])
    y = pix // W
    x = pix - y * W
    inside = pix_ok[:, None] & (ch < C)[None, :]
    offsets = p * sg_n + (y * sg_h + x * sg_w)[:, None] + ch[None, :] * sg_c
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _tail_config(channels: int, fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): about 4096 (2048 in float64) values of each feature tile per program."""
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, min(64, (2048 if fp64 else 4096) // block_c))
    return block_p, block_c, 4 if block_c <= 256 else 8


def lpips_tail_forward(
    pred_feat: torch.Tensor,
    target_feat: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    num_frames: int,
    eps: float,
    *,
    n_split: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """pred_feat (B*G*F, C, h, w), target_feat (B*F, C, h, w) (any strides, e.g. channels_last), weight (C,)
    -> partials (B*G*F, n_split) summing to the tap's LPIPS distance per predicted frame."""
    n_pred, channels, h, w = pred_feat.shape
    acc_dtype = _compute_dtype(pred_feat.dtype)
    block_p, block_c, num_warps = _tail_config(channels, acc_dtype == torch.float64)
    if n_split is None:
        n_split = _split(n_pred, triton.cdiv(h * w, block_p), pred_feat.device)
    if out is None:
        out = torch.empty((n_pred, n_split), dtype=acc_dtype, device=pred_feat.device)
    if n_pred:
        _lpips_tail_fwd_kernel[(n_pred, n_split)](
            pred_feat, target_feat, weight, out,
            channels, h, w, group_size, num_frames, n_split, 1.0 / (h * w), eps * eps,
            *pred_feat.stride(), *target_feat.stride(),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
        )
    return out


def lpips_tail_backward(
    pred_feat: torch.Tensor,
    target_feat: torch.Tensor,
    weight: torch.Tensor,
    grad_dist: torch.Tensor,
    group_size: int,
    num_frames: int,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d(sum_p grad_dist[p] * distance[p]) / d(pred_feat), in pred_feat's dtype and memory format."""
    n_pred, channels, h, w = pred_feat.shape
    acc_dtype = _compute_dtype(pred_feat.dtype)
    block_p, block_c, num_warps = _tail_config(channels, acc_dtype == torch.float64)
    if out is None:
        out = torch.empty_like(pred_feat)
    grad_dist = grad_dist.to(acc_dtype).contiguous()
    if n_pred:
        _lpips_tail_bwd_kernel[(n_pred, triton.cdiv(h * w, block_p))](
            pred_feat, target_feat, weight, grad_dist, out,
            channels, h, w, group_size, num_frames, 1.0 / (h * w), eps * eps,
            *pred_feat.stride(), *target_feat.stride(), *out.stride(),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
        )
    return out
