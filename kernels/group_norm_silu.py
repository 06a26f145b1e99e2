"""Fused GroupNorm + SiLU in Triton, forward and backward.

Spec: ``rlvrw.reference.group_norm_silu``. x is viewed as (N, C, S) with any strides: NCHW-contiguous and
channels_last both are such views, so neither is copied; the output gets the same strides. A group (n, g) is the
(C/G) x S slab of channels [g C/G, (g+1) C/G); programs walk it in [BLOCK_C, BLOCK_S] tiles whose fast axis the
compiler takes from whichever stride is 1 (S for NCHW, C for channels_last).

Forward, with xhat = (x - mean) rstd, y = xhat w + b, out = y sigmoid(y):

* one program per group (``SPLIT = 1``): moments, then the output. When the whole group fits in one tile it is read
  once and kept in registers; otherwise it is read twice (the second read of a group that just went through the SM
  usually comes from L2).
* ``SPLIT > 1`` programs per group (few groups for the GPU, e.g. one frame): each writes the moments of its slice of
  S, then a second kernel merges a group's moments and normalizes its slice.

Moments are merged tile by tile with Chan et al.'s update (count, mean, M2), never as E[x^2] - E[x]^2, so a large
mean does not cancel the variance. Math is float32 (float64 for float64 x).

Backward, with dy = d(out) * silu'(y), per (n, c) sums P = sum_s dy xhat and Q = sum_s dy give everything:
d(bias) = sum_n Q, d(weight) = sum_n P, and per group A = sum_c w_c Q_c, B = sum_c w_c P_c, M = (C/G) S::

    dx = rstd (w dy - A / M - xhat B / M)

so the backward reads x and d(out) twice and writes dx once (one kernel for ``SPLIT = 1``, two otherwise). Nothing
here checks inputs (see ``rlvrw.ops``) or syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # elements per tile: 8 per thread at 16 warps, in registers without spills
# One 16-byte bf16 vector per thread and tile. 16 (8 warps for a 4096 tile) spilled 8 bytes in the channels_last
# forward on sm_90 (bench/static_compile.py: ptxas 13 with Triton's --regAllocOptLevel=2).
ELEMENTS_PER_THREAD = 8
ONE_TILE_ELEMENTS = 8192  # a group whose padded tile is up to this size is held in registers (16 warps)
MIN_PROGRAMS = 264  # two programs per SM of a 132-SM GPU; fewer groups than this split S across programs
MIN_SPLIT_ELEMENTS = 16384  # never split a group into slices smaller than this


@triton.jit
def _tile(base, c0, s0, sc, ss, cg, s_hi, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets, mask and channel indices (within the group) of the tile at channel c0, position s0."""
    cs = c0 + tl.arange(0, BLOCK_C)
    sp = s0 + tl.arange(0, BLOCK_S)
    mask = (cs < cg)[:, None] & (sp < s_hi)[None, :]
    offs = base + cs.to(tl.int64)[:, None] * sc + sp.to(tl.int64)[None, :] * ss
    return offs, mask, cs


@triton.jit
def _tile_moments(x, mask, n_tile):
    """(mean, M2) of the masked tile, two-pass in registers."""
    mean = tl.sum(x) / n_tile
    centered = tl.where(mask, x - mean, 0.0)
    return mean, tl.sum(centered * centered)


@triton.jit
def _merge(count, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.: the moments of two disjoint sets from theirs."""
    total = count + n_b
    delta = mean_b - mean
    frac = n_b / total
    return total, mean + delta * frac, m2 + m2_b + delta * delta * count * frac


@triton.jit
def _slice_moments(
    x_ptr, base, sc, ss, cg, s_lo, s_hi, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
):
    """(count, mean, M2) over channels [0, cg) x positions [s_lo, s_hi) of a group."""
    count = tl.zeros([], ACC)
    mean = tl.zeros([], ACC)
    m2 = tl.zeros([], ACC)
    for c0 in range(0, cg, BLOCK_C):
        n_c = tl.minimum(cg - c0, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask, _ = _tile(base, c0, s0, sc, ss, cg, s_hi, BLOCK_C, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            n_tile = (n_c * tl.minimum(s_hi - s0, BLOCK_S)).to(ACC)
            t_mean, t_m2 = _tile_moments(x, mask, n_tile)
            count, mean, m2 = _merge(count, mean, m2, n_tile, t_mean, t_m2)
    return count, mean, m2


@triton.jit
def _affine(cs, c_mask, c_first, w_ptr, b_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Per-channel weight and bias of the tile's channels (1 and 0 when absent)."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c_first + cs, mask=c_mask, other=0.0).to(ACC)
    else:
        w = tl.full(cs.shape, 1.0, ACC)
    if HAS_BIAS:
        b = tl.load(b_ptr + c_first + cs, mask=c_mask, other=0.0).to(ACC)
    else:
        b = tl.zeros(cs.shape, ACC)
    return w, b


@triton.jit
def _silu_of_norm(x, mean, rstd, w, b):
    y = (x - mean) * rstd * w[:, None] + b[:, None]
    return y * tl.sigmoid(y)


@triton.jit
def _normalize_slice(
    x_ptr, x_base, sc, ss, y_ptr, y_base, ysc, yss, cg, s_lo, s_hi, c_first, mean, rstd, w_ptr, b_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    for c0 in range(0, cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        w, b = _affine(cs, cs < cg, c_first, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask, _ = _tile(x_base, c0, s0, sc, ss, cg, s_hi, BLOCK_C, BLOCK_S)
            y_offs, _, _ = _tile(y_base, c0, s0, ysc, yss, cg, s_hi, BLOCK_C, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            out = _silu_of_norm(x, mean, rstd, w, b)
            tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    x_ptr, sn, sc, ss,
    y_ptr, ysn, ysc, yss,
    w_ptr, b_ptr, mean_ptr, rstd_ptr,
    n_groups, cg, n_pos, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_TILE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per group (n, g)."""
    group = tl.program_id(0)
    n = group // n_groups
    c_first = (group - n * n_groups) * cg
    x_base = n.to(tl.int64) * sn + c_first.to(tl.int64) * sc
    y_base = n.to(tl.int64) * ysn + c_first.to(tl.int64) * ysc
    if ONE_TILE:
        offs, mask, cs = _tile(x_base, 0, 0, sc, ss, cg, n_pos, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean, m2 = _tile_moments(x, mask, (cg * n_pos).to(ACC))
        rstd = 1.0 / tl.sqrt(m2 / (cg * n_pos) + eps)
        w, b = _affine(cs, cs < cg, c_first, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
        y_offs, _, _ = _tile(y_base, 0, 0, ysc, yss, cg, n_pos, BLOCK_C, BLOCK_S)
        tl.store(y_ptr + y_offs, _silu_of_norm(x, mean, rstd, w, b).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        count, mean, m2 = _slice_moments(x_ptr, x_base, sc, ss, cg, 0, n_pos, ACC, BLOCK_C, BLOCK_S)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        _normalize_slice(
            x_ptr, x_base, sc, ss, y_ptr, y_base, ysc, yss, cg, 0, n_pos, c_first, mean, rstd, w_ptr, b_ptr,
            HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C, BLOCK_S,
        )
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, rstd)


@triton.jit
def _split_moments_kernel(
    x_ptr, sn, sc, ss, moments_ptr, n_groups, cg, n_pos, slice_len,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (group, slice): (count, mean, M2) of the slice into moments[group, slice, :]."""
    group = tl.program_id(0)
    part = tl.program_id(1)
    n = group // n_groups
    c_first = (group - n * n_groups) * cg
    x_base = n.to(tl.int64) * sn + c_first.to(tl.int64) * sc
    s_lo = part * slice_len
    s_hi = tl.minimum(s_lo + slice_len, n_pos)
    count, mean, m2 = _slice_moments(x_ptr, x_base, sc, ss, cg, s_lo, s_hi, ACC, BLOCK_C, BLOCK_S)
    out = moments_ptr + (group * tl.num_programs(1) + part) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _split_normalize_kernel(
    x_ptr, sn, sc, ss,
    y_ptr, ysn, ysc, yss,
    w_ptr, b_ptr, moments_ptr, mean_ptr, rstd_ptr,
    n_groups, cg, n_pos, slice_len, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    SPLIT_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (group, slice): merge the group's slice moments, normalize this slice."""
    group = tl.program_id(0)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    parts = tl.arange(0, SPLIT_PAD)
    p_mask = parts < n_parts
    rows = moments_ptr + (group * n_parts + parts) * 3
    counts = tl.load(rows, mask=p_mask, other=0.0)
    means = tl.load(rows + 1, mask=p_mask, other=0.0)
    m2s = tl.load(rows + 2, mask=p_mask, other=0.0)
    total = tl.sum(counts)
    mean = tl.sum(counts * means) / total
    spread = means - mean
    m2 = tl.sum(m2s + counts * spread * spread)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    if part == 0:
        tl.store(mean_ptr + group, mean)
        tl.store(rstd_ptr + group, rstd)

    n = group // n_groups
    c_first = (group - n * n_groups) * cg
    s_lo = part * slice_len
    _normalize_slice(
        x_ptr, n.to(tl.int64) * sn + c_first.to(tl.int64) * sc, sc, ss,
        y_ptr, n.to(tl.int64) * ysn + c_first.to(tl.int64) * ysc, ysc, yss,
        cg, s_lo, tl.minimum(s_lo + slice_len, n_pos), c_first, mean, rstd, w_ptr, b_ptr,
        HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C, BLOCK_S,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _dy_and_xhat(x, g, mean, rstd, w, b):
    """(d loss / d y, xhat) of a tile: y = xhat w + b, out = silu(y)."""
    xhat = (x - mean) * rstd
    y = xhat * w[:, None] + b[:, None]
    sig = tl.sigmoid(y)
    return g * sig * (1.0 + y * (1.0 - sig)), xhat


@triton.jit
def _slice_channel_sums(
    x_ptr, x_base, sc, ss, g_ptr, g_base, gsc, gss, sums_ptr, sums_stride, cg, s_lo, s_hi, c_first, mean, rstd,
    w_ptr, b_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per channel of the slice: P = sum dy xhat, Q = sum dy, stored at sums_ptr + c * sums_stride (+1 for Q).
    Returns the slice's contributions to A = sum_c w_c Q_c and B = sum_c w_c P_c."""
    a = tl.zeros([], ACC)
    b_sum = tl.zeros([], ACC)
    for c0 in range(0, cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < cg
        w, b = _affine(cs, c_mask, c_first, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
        p = tl.zeros([BLOCK_C], ACC)
        q = tl.zeros([BLOCK_C], ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask, _ = _tile(x_base, c0, s0, sc, ss, cg, s_hi, BLOCK_C, BLOCK_S)
            g_offs, _, _ = _tile(g_base, c0, s0, gsc, gss, cg, s_hi, BLOCK_C, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(ACC)
            dy, xhat = _dy_and_xhat(x, g, mean, rstd, w, b)
            p += tl.sum(tl.where(mask, dy * xhat, 0.0), axis=1)
            q += tl.sum(tl.where(mask, dy, 0.0), axis=1)
        tl.store(sums_ptr + cs * sums_stride, p, mask=c_mask)
        tl.store(sums_ptr + cs * sums_stride + 1, q, mask=c_mask)
        a += tl.sum(w * q)
        b_sum += tl.sum(w * p)
    return a, b_sum


@triton.jit
def _dx_slice(
    x_ptr, x_base, sc, ss, g_ptr, g_base, gsc, gss, dx_ptr, dx_base, dsc, dss, cg, s_lo, s_hi, c_first, mean, rstd,
    a_mean, b_mean, w_ptr, b_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    for c0 in range(0, cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        w, b = _affine(cs, cs < cg, c_first, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask, _ = _tile(x_base, c0, s0, sc, ss, cg, s_hi, BLOCK_C, BLOCK_S)
            g_offs, _, _ = _tile(g_base, c0, s0, gsc, gss, cg, s_hi, BLOCK_C, BLOCK_S)
            dx_offs, _, _ = _tile(dx_base, c0, s0, dsc, dss, cg, s_hi, BLOCK_C, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(ACC)
            dy, xhat = _dy_and_xhat(x, g, mean, rstd, w, b)
            dx = rstd * (dy * w[:, None] - a_mean - xhat * b_mean)
            tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    x_ptr, sn, sc, ss,
    g_ptr, gsn, gsc, gss,
    dx_ptr, dsn, dsc, dss,
    w_ptr, b_ptr, mean_ptr, rstd_ptr, sums_ptr,
    n_groups, cg, n_pos,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_TILE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per group: channel sums (into sums[n, c, 0, :]), then dx."""
    group = tl.program_id(0)
    n = group // n_groups
    c_first = (group - n * n_groups) * cg
    n64 = n.to(tl.int64)
    c64 = c_first.to(tl.int64)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    sums = sums_ptr + (n64 * n_groups * cg + c64) * 2
    size = (cg * n_pos).to(ACC)
    if ONE_TILE:
        offs, mask, cs = _tile(n64 * sn + c64 * sc, 0, 0, sc, ss, cg, n_pos, BLOCK_C, BLOCK_S)
        g_offs, _, _ = _tile(n64 * gsn + c64 * gsc, 0, 0, gsc, gss, cg, n_pos, BLOCK_C, BLOCK_S)
        dx_offs, _, _ = _tile(n64 * dsn + c64 * dsc, 0, 0, dsc, dss, cg, n_pos, BLOCK_C, BLOCK_S)
        c_mask = cs < cg
        w, b = _affine(cs, c_mask, c_first, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        dy, xhat = _dy_and_xhat(x, g, mean, rstd, w, b)
        p = tl.sum(tl.where(mask, dy * xhat, 0.0), axis=1)
        q = tl.sum(tl.where(mask, dy, 0.0), axis=1)
        tl.store(sums + cs * 2, p, mask=c_mask)
        tl.store(sums + cs * 2 + 1, q, mask=c_mask)
        dx = rstd * (dy * w[:, None] - tl.sum(w * q) / size - xhat * (tl.sum(w * p) / size))
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        a, b_sum = _slice_channel_sums(
            x_ptr, n64 * sn + c64 * sc, sc, ss, g_ptr, n64 * gsn + c64 * gsc, gsc, gss, sums, 2, cg, 0, n_pos,
            c_first, mean, rstd, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C, BLOCK_S,
        )
        _dx_slice(
            x_ptr, n64 * sn + c64 * sc, sc, ss, g_ptr, n64 * gsn + c64 * gsc, gsc, gss,
            dx_ptr, n64 * dsn + c64 * dsc, dsc, dss, cg, 0, n_pos, c_first, mean, rstd, a / size, b_sum / size,
            w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C, BLOCK_S,
        )


@triton.jit
def _split_sums_kernel(
    x_ptr, sn, sc, ss,
    g_ptr, gsn, gsc, gss,
    w_ptr, b_ptr, mean_ptr, rstd_ptr, sums_ptr,
    n_groups, cg, n_pos, slice_len,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (group, slice): the slice's channel sums into sums[n, c, slice, :] (layout (N, C, SPLIT, 2))."""
    group = tl.program_id(0)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    n = group // n_groups
    c_first = (group - n * n_groups) * cg
    n64 = n.to(tl.int64)
    c64 = c_first.to(tl.int64)
    s_lo = part * slice_len
    sums = sums_ptr + ((n64 * n_groups * cg + c64) * n_parts + part) * 2
    _slice_channel_sums(
        x_ptr, n64 * sn + c64 * sc, sc, ss, g_ptr, n64 * gsn + c64 * gsc, gsc, gss, sums, n_parts * 2, cg, s_lo,
        tl.minimum(s_lo + slice_len, n_pos), c_first, tl.load(mean_ptr + group), tl.load(rstd_ptr + group),
        w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C, BLOCK_S,
    )


@triton.jit
def _split_dx_kernel(
    x_ptr, sn, sc, ss,
    g_ptr, gsn, gsc, gss,
    dx_ptr, dsn, dsc, dss,
    w_ptr, b_ptr, mean_ptr, rstd_ptr, sums_ptr,
    n_groups, cg, n_pos, slice_len,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    SPLIT_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (group, slice): A and B from every slice's channel sums of the group, then dx of this slice."""
    group = tl.program_id(0)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    n = group // n_groups
    c_first = (group - n * n_groups) * cg
    n64 = n.to(tl.int64)
    c64 = c_first.to(tl.int64)
    sums = sums_ptr + (n64 * n_groups * cg + c64) * n_parts * 2
    parts = tl.arange(0, SPLIT_PAD)
    a = tl.zeros([], ACC)
    b_sum = tl.zeros([], ACC)
    for c0 in range(0, cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < cg
        w, _ = _affine(cs, c_mask, c_first, w_ptr, b_ptr, HAS_WEIGHT, False, ACC)
        at = sums + (cs[:, None] * n_parts + parts[None, :]) * 2
        mask = c_mask[:, None] & (parts < n_parts)[None, :]
        p = tl.sum(tl.load(at, mask=mask, other=0.0), axis=1)
        q = tl.sum(tl.load(at + 1, mask=mask, other=0.0), axis=1)
        a += tl.sum(w * q)
        b_sum += tl.sum(w * p)
    size = (cg * n_pos).to(ACC)
    s_lo = part * slice_len
    _dx_slice(
        x_ptr, n64 * sn + c64 * sc, sc, ss, g_ptr, n64 * gsn + c64 * gsc, gsc, gss,
        dx_ptr, n64 * dsn + c64 * dsc, dsc, dss, cg, s_lo, tl.minimum(s_lo + slice_len, n_pos), c_first,
        tl.load(mean_ptr + group), tl.load(rstd_ptr + group), a / size, b_sum / size,
        w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C, BLOCK_S,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def launch_config(n_groups_total: int, cg: int, n_pos: int, channels_last: bool, split=None, block_c=None,
                  block_s=None):
    """(split, slice_len, BLOCK_C, BLOCK_S, one_tile, num_warps); explicit arguments override the heuristic.

    A whole group in one tile when it has at most ONE_TILE_ELEMENTS (one read forward). Otherwise tiles of
    TILE_ELEMENTS, spending them along the unit-stride axis first: all of a group's channels for channels_last
    (channels are adjacent), long runs of positions for NCHW. Fewer groups than MIN_PROGRAMS split S into slices
    (at least MIN_SPLIT_ELEMENTS each) so the GPU has work for every SM. Chosen from first principles, not timed.
    """
    group_size = cg * n_pos
    padded_group = triton.next_power_of_2(cg) * triton.next_power_of_2(n_pos)
    if split is None:
        split = 1
        if n_groups_total < MIN_PROGRAMS and padded_group > ONE_TILE_ELEMENTS:
            wanted = triton.cdiv(MIN_PROGRAMS, n_groups_total)
            split = max(1, min(wanted, group_size // MIN_SPLIT_ELEMENTS))
    slice_len = triton.cdiv(n_pos, split)
    one_tile = split == 1 and padded_group <= ONE_TILE_ELEMENTS and block_c is None and block_s is None
    if one_tile:
        block_c, block_s = triton.next_power_of_2(cg), triton.next_power_of_2(n_pos)
    else:
        if channels_last:
            block_c = block_c or min(triton.next_power_of_2(cg), TILE_ELEMENTS)
            block_s = block_s or max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(slice_len)))
        else:
            block_s = block_s or min(triton.next_power_of_2(slice_len), TILE_ELEMENTS)
            block_c = block_c or max(1, min(TILE_ELEMENTS // block_s, triton.next_power_of_2(cg)))
        if split > 1:  # slices start on tile boundaries so that only the last one is partial
            slice_len = triton.cdiv(slice_len, block_s) * block_s
            split = triton.cdiv(n_pos, slice_len)
    num_warps = max(1, min(16, (block_c * block_s) // (32 * ELEMENTS_PER_THREAD)))
    return split, slice_len, block_c, block_s, one_tile, num_warps


def _is_channels_last(x3: torch.Tensor) -> bool:
    return x3.stride(1) == 1 and x3.shape[1] > 1


def group_norm_silu_forward(x, num_groups, weight, bias, eps, y=None, *, split=None, block_c=None, block_s=None):
    """x (N, C, S) any strides -> (out with x's strides and dtype (into ``y``, any strides, when given), mean (N*G,),
    rstd (N*G,) in the compute dtype)."""
    n_batch, channels, n_pos = x.shape
    cg = channels // num_groups
    torch_acc, tl_acc = _acc(x.dtype)
    if y is None:
        y = torch.empty_like(x)
    mean = torch.empty(n_batch * num_groups, dtype=torch_acc, device=x.device)
    rstd = torch.empty_like(mean)
    n_groups_total = n_batch * num_groups
    split, slice_len, block_c, block_s, one_tile, num_warps = launch_config(
        n_groups_total, cg, n_pos, _is_channels_last(x), split, block_c, block_s
    )
    common = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC=tl_acc, BLOCK_C=block_c,
                  BLOCK_S=block_s, num_warps=num_warps)
    w = weight if weight is not None else mean  # placeholders when absent: never read
    b = bias if bias is not None else mean
    if split == 1:
        _forward_kernel[(n_groups_total,)](
            x, *x.stride(), y, *y.stride(), w, b, mean, rstd, num_groups, cg, n_pos, eps,
            ONE_TILE=one_tile, **common,
        )
        return y, mean, rstd
    moments = torch.empty((n_groups_total, split, 3), dtype=torch_acc, device=x.device)
    _split_moments_kernel[(n_groups_total, split)](
        x, *x.stride(), moments, num_groups, cg, n_pos, slice_len,
        ACC=tl_acc, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )
    _split_normalize_kernel[(n_groups_total, split)](
        x, *x.stride(), y, *y.stride(), w, b, moments, mean, rstd, num_groups, cg, n_pos, slice_len, eps,
        SPLIT_PAD=triton.next_power_of_2(split), **common,
    )
    return y, mean, rstd


def group_norm_silu_backward(
    grad_y, x, num_groups, weight, bias, mean, rstd, need_weight_grads=True, dx=None, *, split=None, block_c=None,
    block_s=None,
):
    """(dx with x's strides and dtype (into ``dx``, any strides, when given), dweight, dbias in the weight / bias
    dtype or None) from d(out) (any strides, expanded ones included) and the forward's mean and rstd."""
    n_batch, channels, n_pos = x.shape
    cg = channels // num_groups
    torch_acc, tl_acc = _acc(x.dtype)
    if dx is None:
        dx = torch.empty_like(x)
    n_groups_total = n_batch * num_groups
    split, slice_len, block_c, block_s, one_tile, num_warps = launch_config(
        n_groups_total, cg, n_pos, _is_channels_last(x), split, block_c, block_s
    )
    sums = torch.empty((n_batch, channels, split, 2), dtype=torch_acc, device=x.device)
    common = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC=tl_acc, BLOCK_C=block_c,
                  BLOCK_S=block_s, num_warps=num_warps)
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    if split == 1:
        _backward_kernel[(n_groups_total,)](
            x, *x.stride(), grad_y, *grad_y.stride(), dx, *dx.stride(), w, b, mean, rstd, sums,
            num_groups, cg, n_pos, ONE_TILE=one_tile, **common,
        )
    else:
        _split_sums_kernel[(n_groups_total, split)](
            x, *x.stride(), grad_y, *grad_y.stride(), w, b, mean, rstd, sums, num_groups, cg, n_pos, slice_len,
            **common,
        )
        _split_dx_kernel[(n_groups_total, split)](
            x, *x.stride(), grad_y, *grad_y.stride(), dx, *dx.stride(), w, b, mean, rstd, sums,
            num_groups, cg, n_pos, slice_len, SPLIT_PAD=triton.next_power_of_2(split), **common,
        )
    dweight = dbias = None
    if need_weight_grads:
        totals = sums.sum(dim=(0, 2))
        if weight is not None:
            dweight = totals[:, 0].to(weight.dtype)
        if bias is not None:
            dbias = totals[:, 1].to(bias.dtype)
    return dx, dweight, dbias
