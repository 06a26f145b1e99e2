"""Token log-probabilities, log-sum-exp and entropy of a temperature-scaled softmax over logits rows, in Triton.

The two primitives of ``rlvrw.reference.logprobs`` with the same signatures and semantics:

* ``logits_forward``: one pass over each row (online log-sum-exp that also carries the entropy sum) plus one scalar
  load of the token's logit.
* ``logits_backward``: one read of every logit and one write of every gradient, recomputing p = exp(z - lse); the
  output may be the logits buffer itself (in-place backward).

With ``z = logits * inv_temperature``, ``lse = logsumexp(z)`` and ``p = softmax(z)``::

    logp    = z[token] - lse
    entropy = lse - sum_j p_j z_j
    dlogits = inv_temperature * (g_logp * (onehot(token) - p) - g_entropy * p * (z - lse + entropy))

Math is float32 for half/bfloat16/float32 logits and float64 for float64 logits. Conventions shared with
``csrc/rlvrw_kernels.h`` for inputs the reference leaves undefined: a row whose logits are all -inf gives lse = -inf,
logp = -inf, entropy = 0 and p = 0 in the backward (no NaN); a token outside [0, V) reads nothing and gives logp = -inf
and no one-hot term. NaN logits propagate; +inf logits give NaN (as torch does). In the backward, a row whose
upstream gradients (g_logp and g_entropy) are both 0 gets a gradient of exactly 0 and is not read: a masked position
never turns garbage logits into a NaN gradient.

Rows: the logits are (N, V) or (B, T, V) with unit stride along V and any other strides, so the ``[:, :-1]`` slice of
a model's (B, T + 1, V) output is read in place. Every row is split into a head, a body and a tail (``_split_row``):
the body starts on a 16-byte boundary and is read (and written) in 16-byte vectors; head and tail, fewer than 16
bytes each, are read one element at a time. This gives vector loads at any vocabulary size and row stride (V = 4633,
the video world model's vocabulary, included), which Triton alone would only emit for strides it can prove to be
multiples of 16 bytes. The same split is what ``csrc/logits_common.cuh`` does for the CUDA path.

Each program handles BLOCK_N rows and walks the vocabulary in BLOCK_V columns: BLOCK_N = 1 for large vocabularies,
several rows per program for small ones (see ``_launch_config``). Nothing here checks inputs (see ``rlvrw.ops``) and
nothing synchronizes with the host.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _inv_temperature(inv_t_hi, inv_t_lo, ACC: tl.constexpr):
    # Python floats reach a kernel as float32, so a float64 inv_temperature travels as hi + lo (two float32s whose sum
    # is the float64 value to ~1e-15); float32 math uses hi alone, which is exactly what torch uses for fp32 tensors.
    if ACC == tl.float64:
        return tl.cast(inv_t_hi, tl.float64) + tl.cast(inv_t_lo, tl.float64)
    else:
        return tl.cast(inv_t_hi, tl.float32)


@triton.jit
def _row_starts(pid, n_rows, rows_per_seq, seq_stride, row_stride, BLOCK_N: tl.constexpr):
    """The program's BLOCK_N rows: their index, validity and start offset (int64 elements) in a (B, T, V) layout
    where row r is sequence r // T, position r % T (a plain (N, V) matrix is one sequence of N rows)."""
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    seq = rows // rows_per_seq
    # int64 offsets: rows x row_stride exceeds 2^31 for the large problems (e.g. 657k rows x 4633).
    starts = seq.to(tl.int64) * seq_stride + (rows - seq * rows_per_seq).to(tl.int64) * row_stride
    return rows.to(tl.int64), row_mask, starts


@triton.jit
def _split_row(starts, n_cols, VEC: tl.constexpr):
    """Each row as [head | body | tail]: the body starts at an offset that is a multiple of VEC elements (16 bytes
    from a 16-byte aligned base pointer) and holds a multiple of VEC elements, so it is read in 16-byte vectors
    whatever the row stride; head and tail (fewer than VEC elements each) are read one by one.
    Returns (head length, body length, body start offsets)."""
    to_boundary = (VEC - starts % VEC) % VEC
    head = tl.minimum(to_boundary, n_cols).to(tl.int32)
    body = ((n_cols - head) // VEC) * VEC  # 0 in a row too short to reach the boundary (then head = n_cols)
    # True even then. The hint must sit on a value computed here: on an argument it would be lost in inlining.
    body_starts = tl.multiple_of(starts + to_boundary, VEC)
    return head, body, body_starts


@triton.jit
def _edge_columns(head, body, n_cols, row_mask, VEC: tl.constexpr):
    """(BLOCK_N, 2 * VEC) column indices of each row's head (first VEC lanes) and tail (last VEC lanes), and which
    of them exist."""
    j = tl.arange(0, 2 * VEC)[None, :]
    cols = tl.where(j < VEC, j, head[:, None] + body[:, None] + (j - VEC))
    in_row = tl.where(j < VEC, j < head[:, None], cols < n_cols)
    return cols, in_row & row_mask[:, None]


@triton.jit
def _load_tile(ptr, body_starts, cols, body, mask_rows, other):
    """A (BLOCK_N, BLOCK_V) tile of the rows' bodies (see _split_row): 16-byte vector loads."""
    mask = mask_rows[:, None] & (cols[None, :] < body[:, None])
    return tl.load(ptr + body_starts[:, None] + cols[None, :], mask=mask, other=other)


@triton.jit
def _store_tile(ptr, body_starts, cols, body, mask_rows, value):
    """Store a tile of the rows' bodies: 16-byte vector stores when ``body_starts`` is known to be a multiple of
    16 bytes, else scalar ones."""
    mask = mask_rows[:, None] & (cols[None, :] < body[:, None])
    tl.store(ptr + body_starts[:, None] + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _online_update(m, s, t, z, WITH_ENTROPY: tl.constexpr):
    """Fold a (BLOCK_N, k) tile of z into the online softmax state (m, s, t) of each row: m is the running max of z,
    s = sum exp(z - m) and t = sum exp(z - m) * (z - m), both relative to the current m. Carrying (z - m) instead of z
    keeps the entropy free of the cancellation lse - sum p z would suffer for large logits: entropy = log(s) - t / s."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # While a row has only seen -inf, shift by 0 instead of -inf so that exp() gives 0, never NaN (-inf - -inf).
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)  # rescales s and t from m to m_new; 0 while m is -inf (then s = t = 0)
    zc = z - shift[:, None]
    e = tl.exp(zc)
    if WITH_ENTROPY:
        # t relative to m_new: sum e^(z-m_new) (z-m_new) = alpha * (t + (m - m_new) * s).
        delta = tl.where(m == float("-inf"), 0.0, m - shift)
        # e = 0 where z = -inf (or underflows): keep 0 * -inf out of the sum.
        t = alpha * (t + delta * s) + tl.sum(tl.where(e > 0, e * zc, 0.0), axis=1)
    s = s * alpha + tl.sum(e, axis=1)
    return m_new, s, t


# The row layout and sizes are not specialized (16-divisible or not): the head/body/tail split makes the loads the same
# either way, and one binary then serves every vocabulary, stride and row count. Nor is the alignment of the per-row
# vectors (a chunk's tokens[rows] slice): they are read once per row.
_PER_ROW = ["tokens_ptr", "lse_ptr", "grad_logp_ptr", "entropy_ptr", "grad_entropy_ptr"]
_LAYOUT = ["rows_per_seq", "seq_stride", "row_stride", "n_rows", "n_cols"]


@triton.jit(do_not_specialize=_LAYOUT, do_not_specialize_on_alignment=_PER_ROW[:1])
def _logits_forward_kernel(
    logits_ptr,
    rows_per_seq,
    seq_stride,
    row_stride,
    tokens_ptr,
    tokens_stride,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    n_rows,
    n_cols,
    inv_t_hi,
    inv_t_lo,
    ACC: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    inv_t = _inv_temperature(inv_t_hi, inv_t_lo, ACC)
    rows, row_mask, starts = _row_starts(tl.program_id(0), n_rows, rows_per_seq, seq_stride, row_stride, BLOCK_N)
    head, body, body_starts = _split_row(starts, n_cols, VEC)

    # The head and tail first (scalar loads), then the body in BLOCK_V steps (16-byte loads).
    edge_cols, edge_mask = _edge_columns(head, body, n_cols, row_mask, VEC)
    z_edge = tl.load(logits_ptr + starts[:, None] + edge_cols, mask=edge_mask, other=float("-inf")).to(ACC) * inv_t
    m0 = tl.full([BLOCK_N], float("-inf"), ACC)
    m, s, t = _online_update(m0, tl.zeros([BLOCK_N], ACC), tl.zeros([BLOCK_N], ACC), z_edge, WITH_ENTROPY)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = _load_tile(logits_ptr, body_starts, cols, body, row_mask, float("-inf")).to(ACC) * inv_t
        m, s, t = _online_update(m, s, t, z, WITH_ENTROPY)

    # s == 0 only for a row that is all -inf; NaN logits make s NaN and propagate to every output.
    has_mass = s != 0
    log_s = tl.log(s)
    lse = tl.where(has_mass, m + log_s, float("-inf"))

    tok = tl.load(tokens_ptr + rows * tokens_stride, mask=row_mask, other=-1).to(tl.int64)
    tok_valid = row_mask & (tok >= 0) & (tok < n_cols)
    z_tok = tl.load(logits_ptr + starts + tok, mask=tok_valid, other=float("-inf")).to(ACC) * inv_t
    logp = tl.where(has_mass, z_tok - lse, float("-inf"))

    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WITH_ENTROPY:
        entropy = tl.where(has_mass, log_s - t / s, 0.0)
        tl.store(entropy_ptr + rows, entropy, mask=row_mask)


@triton.jit
def _grad_tile(z, cols, tok, lse, c_logp, c_ent, ent, live, WITH_ENTROPY: tl.constexpr):
    """d(loss)/d(logits) of a tile of z = logits * inv_t (see the module docstring), exactly 0 in rows whose upstream
    gradients are both 0 (``live`` false) whatever their logits hold (NaN, inf)."""
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    if WITH_ENTROPY:
        # p = 0 (a -inf logit): log p is -inf, and 0 * -inf must not leak NaN into the gradient.
        log_p = tl.where(p > 0, log_p, 0.0)
        coef = c_logp[:, None] + c_ent[:, None] * (log_p + ent[:, None])
    else:
        coef = c_logp[:, None]
    grad = tl.where(cols == tok[:, None], c_logp[:, None], 0.0) - p * coef
    return tl.where(live[:, None], grad, 0.0)


@triton.jit(do_not_specialize=_LAYOUT + ["out_seq_stride", "out_row_stride"], do_not_specialize_on_alignment=_PER_ROW)
def _logits_backward_kernel(
    logits_ptr,
    rows_per_seq,
    seq_stride,
    row_stride,
    out_ptr,
    out_seq_stride,
    out_row_stride,
    tokens_ptr,
    tokens_stride,
    lse_ptr,
    lse_stride,
    grad_logp_ptr,
    grad_logp_stride,
    entropy_ptr,
    entropy_stride,
    grad_entropy_ptr,
    grad_entropy_stride,
    n_rows,
    n_cols,
    inv_t_hi,
    inv_t_lo,
    ACC: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    OUT_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    inv_t = _inv_temperature(inv_t_hi, inv_t_lo, ACC)
    pid = tl.program_id(0)
    rows, row_mask, starts = _row_starts(pid, n_rows, rows_per_seq, seq_stride, row_stride, BLOCK_N)
    _, _, out_starts = _row_starts(pid, n_rows, rows_per_seq, out_seq_stride, out_row_stride, BLOCK_N)
    head, body, body_starts = _split_row(starts, n_cols, VEC)
    out_body_starts = out_starts + head
    if OUT_ALIGNED:  # the output rows sit at the logits rows' offsets modulo VEC: 16-byte stores too
        out_body_starts = tl.multiple_of(out_body_starts, VEC)

    # Per-row scalars, with inv_temperature folded in:
    #   dlogits_j = [j == tok] * c_logp - p_j * (c_logp + c_ent * (log p_j + entropy)),  c_x = inv_t * g_x
    lse = tl.load(lse_ptr + rows * lse_stride, mask=row_mask, other=0.0).to(ACC)
    # An all -inf row has lse = -inf: shift by +inf so that every p_j is exp(-inf) = 0 instead of NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    tok = tl.load(tokens_ptr + rows * tokens_stride, mask=row_mask, other=-1).to(tl.int64)
    if HAS_GRAD_LOGP:
        c_logp = tl.load(grad_logp_ptr + rows * grad_logp_stride, mask=row_mask, other=0.0).to(ACC) * inv_t
    else:
        c_logp = tl.zeros([BLOCK_N], ACC)
    live = c_logp != 0
    if WITH_ENTROPY:
        c_ent = tl.load(grad_entropy_ptr + rows * grad_entropy_stride, mask=row_mask, other=0.0).to(ACC) * inv_t
        ent = tl.load(entropy_ptr + rows * entropy_stride, mask=row_mask, other=0.0).to(ACC)
        live = live | (c_ent != 0)
    else:
        c_ent = c_logp
        ent = c_logp
    # A row without upstream gradient (a masked position) is not read, only written with zeros.
    read = row_mask & live

    # Each element is read before it is written, by the same program: out may be the logits buffer.
    edge_cols, edge_mask = _edge_columns(head, body, n_cols, row_mask, VEC)
    z_edge = tl.load(logits_ptr + starts[:, None] + edge_cols, mask=edge_mask & live[:, None], other=0.0)
    grad_edge = _grad_tile(z_edge.to(ACC) * inv_t, edge_cols, tok, lse, c_logp, c_ent, ent, live, WITH_ENTROPY)
    tl.store(out_ptr + out_starts[:, None] + edge_cols, grad_edge.to(out_ptr.dtype.element_ty), mask=edge_mask)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = _load_tile(logits_ptr, body_starts, cols, body, read, 0.0).to(ACC) * inv_t
        grad = _grad_tile(z, head[:, None] + cols[None, :], tok, lse, c_logp, c_ent, ent, live, WITH_ENTROPY)
        _store_tile(out_ptr, out_body_starts, cols, body, row_mask, grad)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------------

# The kernels are memory bound (one read forward; one read and one write backward), so the tiles aim at enough bytes
# in flight per program, few masked lanes and no register spills. Registers per configuration, sm_90 and sm_80:
# bench/results/sm90-static.md (48 to 101, one row x 8192 with 8 warps or 4 rows x 1024 with 4 warps, 16-byte loads
# and stores, no spills). Before the rows were split into head, body and tail, 8 x 1024 with 8 warps spilled when the
# row stride was not a multiple of 8 elements, and 16 rows of 256 spilled.
MAX_BLOCK_V = 8192  # columns per loop step of one row
MAX_PACKED_TILE = 4096  # elements per loop step when a program packs several rows (BLOCK_N > 1)
MAX_BLOCK_N = 8  # rows per program
MIN_PROGRAMS = 1024  # keep several waves of programs on a 132-SM GPU before packing more rows per program
MAX_PADDING = 1.15  # accepted ratio of loop-covered columns to V when choosing BLOCK_V
ELEMENTS_PER_THREAD = 32  # fp32 math; 16 for fp64 math (twice the registers per element)


def _pick_block_v(n_cols: int, max_block_v: int) -> int:
    """The largest power of two <= max_block_v whose loop covers at most MAX_PADDING * V columns (masked lanes cost
    issue slots); if none does, the one covering the fewest columns."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), max_block_v)
    smallest = min(block, 128)
    best, best_cover = block, float("inf")
    while block >= smallest:
        cover = triton.cdiv(n_cols, block) * block
        if cover <= MAX_PADDING * n_cols:
            return block
        if cover < best_cover:
            best, best_cover = block, cover
        block //= 2
    return best


def _launch_config(n_rows: int, n_cols: int, fp64: bool = False, block_v=None, block_n=None, num_warps=None):
    """(BLOCK_N, BLOCK_V, num_warps) for an (n_rows, n_cols) problem; explicit arguments override the heuristic.

    BLOCK_V: the vocabulary in steps of at most MAX_BLOCK_V columns, sized so few lanes are masked (V = 4633 -> 1024,
    five steps, 10% masked, where 8192 would mask 43%; V = 151936 -> 8192, nineteen steps). BLOCK_N: small
    vocabularies pack rows until a step holds MAX_PACKED_TILE elements (V = 4633 -> 4 rows of 1024), so each program
    moves more bytes per step and the per-step reductions are amortized, while keeping at least MIN_PROGRAMS programs.
    num_warps: ELEMENTS_PER_THREAD tile elements per thread, 1 to 16 warps. Chosen from register counts and first
    principles, not timed (no GPU here); every value can be overridden per call.
    """
    if block_v is None:
        block_v = _pick_block_v(n_cols, MAX_BLOCK_V)
    if block_n is None:
        block_n = max(1, min(MAX_PACKED_TILE // block_v, MAX_BLOCK_N, triton.next_power_of_2(max(n_rows, 1))))
        while block_n > 1 and triton.cdiv(n_rows, block_n) < MIN_PROGRAMS:
            block_n //= 2
    if num_warps is None:
        per_thread = ELEMENTS_PER_THREAD // 2 if fp64 else ELEMENTS_PER_THREAD
        num_warps = max(1, min(16, (block_n * block_v) // (32 * per_thread)))
    return block_n, block_v, num_warps


def _acc_dtype(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _split_inv_temperature(inv_temperature: float) -> tuple[float, float]:
    hi = float(np.float32(inv_temperature))
    lo = float(np.float32(inv_temperature - hi))
    return hi, lo


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _rows(logits: torch.Tensor) -> tuple[int, int, tuple[int, int, int]]:
    """(n_rows, n_cols, (rows_per_seq, seq_stride, row_stride)) of (N, V) or (B, T, V) logits."""
    n_cols = logits.shape[-1]
    if logits.dim() == 2:
        return logits.shape[0], n_cols, (max(logits.shape[0], 1), 0, logits.stride(0))
    batch, seq_len = logits.shape[:2]
    return batch * seq_len, n_cols, (max(seq_len, 1), logits.stride(0), logits.stride(1))


def vector_elements(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector."""
    return 16 // torch.empty(0, dtype=dtype).element_size()


def aligned_like(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the rows of ``b`` start at the offsets of ``a``'s rows modulo 16 bytes (same shape and dtype), so that
    one head/body/tail split of a row serves both."""
    vec = vector_elements(a.dtype)
    return all((sa - sb) % vec == 0 for sa, sb in zip(a.stride()[:-1], b.stride()[:-1]))


def empty_rows_like(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of the logits' shape and dtype, dense but for less than 16 bytes of padding between
    rows, whose rows start at the logits' row offsets modulo 16 bytes (``aligned_like``): the backward of a
    ``[:, :-1]`` slice then writes 16-byte vectors as it reads them."""
    vec = vector_elements(logits.dtype)
    strides, size = [1], logits.shape[-1]
    for dim in range(logits.dim() - 2, -1, -1):
        stride = size + (logits.stride(dim) - size) % vec  # the smallest stride >= size with the logits' residue
        strides.insert(0, stride)
        size = stride * logits.shape[dim]
    buffer = torch.empty(max(size, 1), dtype=logits.dtype, device=logits.device)
    return buffer.as_strided(logits.shape, strides)


def logits_forward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    inv_temperature: float,
    with_entropy: bool,
    *,
    block_v: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits (N, V) or (B, T, V) with unit stride along V (any other strides: a ``[:, :-1]`` slice is read in
    place), tokens (N,) or (B*T,) int32/int64 -> (logp, lse, entropy or None), each (N,) float32 (float64 for float64
    logits)."""
    n_rows, n_cols, layout = _rows(logits)
    torch_acc, tl_acc = _acc_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=torch_acc, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch_acc, device=logits.device)
    entropy = torch.empty(n_rows, dtype=torch_acc, device=logits.device) if with_entropy else None
    if n_rows == 0:
        return logp, lse, entropy
    block_n, block_v, num_warps = _launch_config(
        n_rows, n_cols, logits.dtype == torch.float64, block_v, block_n, num_warps
    )
    inv_t_hi, inv_t_lo = _split_inv_temperature(inv_temperature)
    grid = (triton.cdiv(n_rows, block_n),)
    _logits_forward_kernel[grid](
        logits,
        *layout,
        tokens,
        tokens.stride(0),
        logp,
        lse,
        entropy if with_entropy else logp,  # unused when WITH_ENTROPY is false
        n_rows,
        n_cols,
        inv_t_hi,
        inv_t_lo,
        ACC=tl_acc,
        WITH_ENTROPY=with_entropy,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        VEC=vector_elements(logits.dtype),
        num_warps=num_warps,
    )
    return logp, lse, entropy


def logits_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    inv_temperature: float,
    lse: torch.Tensor,
    grad_logp: torch.Tensor | None,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """d(loss)/d(logits), shaped like the logits, from the per-row gradients of logp and entropy (grad_logp None:
    zeros; grad_entropy None: no entropy term, else ``entropy`` from the forward is required). A row whose upstream
    gradients are all 0 gets exactly 0, whatever its logits hold, and is not read. Written into ``out`` when given
    (the logits' shape, unit stride along V, any other strides; it may be ``logits`` itself), else into a new tensor
    of the logits dtype (``empty_rows_like``). The per-row inputs may have any stride, including 0 (expanded
    gradients)."""
    n_rows, n_cols, layout = _rows(logits)
    if out is None:
        out = empty_rows_like(logits)
    if n_rows == 0:
        return out
    _, tl_acc = _acc_dtype(logits.dtype)
    with_entropy = grad_entropy is not None
    has_grad_logp = grad_logp is not None
    block_n, block_v, num_warps = _launch_config(
        n_rows, n_cols, logits.dtype == torch.float64, block_v, block_n, num_warps
    )
    inv_t_hi, inv_t_lo = _split_inv_temperature(inv_temperature)
    grid = (triton.cdiv(n_rows, block_n),)
    _logits_backward_kernel[grid](
        logits,
        *layout,
        out,
        *_rows(out)[2][1:],
        tokens,
        tokens.stride(0),
        lse,
        lse.stride(0),
        grad_logp if has_grad_logp else lse,  # unused placeholders when the flag is false
        grad_logp.stride(0) if has_grad_logp else 0,
        entropy if with_entropy else lse,
        entropy.stride(0) if with_entropy else 0,
        grad_entropy if with_entropy else lse,
        grad_entropy.stride(0) if with_entropy else 0,
        n_rows,
        n_cols,
        inv_t_hi,
        inv_t_lo,
        ACC=tl_acc,
        HAS_GRAD_LOGP=has_grad_logp,
        WITH_ENTROPY=with_entropy,
        OUT_ALIGNED=aligned_like(logits, out),
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        VEC=vector_elements(logits.dtype),
        num_warps=num_warps,
    )
    return out
