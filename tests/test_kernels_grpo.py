"""Triton GRPO kernels (``kernels/grpo_loss.py``) against the reference ``rlvrw.reference.grpo`` and its autograd.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before
the kernels are imported); with one, the same tests run compiled on CUDA tensors.
"""

import itertools
import math

import pytest
import torch

from rlvrw.kernels import grpo_loss as K
from rlvrw.reference import grpo as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KL_TYPES = ref.KL_TYPES
LOSS_AGGS = ref.LOSS_AGGS


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def make_batch(B, T, seed, dtype=torch.float64, huge=True, per_token_adv=False):
    """Clean inputs: (logp, old, adv, mask, ref_logp). Row 0 fully valid, row 2 (if any) fully masked."""
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    refl = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0] = True
    if B > 2:
        mask[2] = False
    if per_token_adv:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
        adv[:, ::7] = 0.0
    else:
        adv = torch.randn(B, generator=g, dtype=torch.float64)
        adv[-1] = 0.0
    if huge:
        # log-ratios up to +-50 so that log_ratio_clamp (and the k3 value cap) matter
        n = max(1, T // 10)
        idx = torch.randint(0, T, (B, n), generator=g)
        big = (torch.rand(B, n, generator=g, dtype=torch.float64) * 2 - 1) * 50
        old.scatter_(1, idx, logp.gather(1, idx) + big)
        idx = torch.randint(0, T, (B, n), generator=g)
        big = (torch.rand(B, n, generator=g, dtype=torch.float64) * 2 - 1) * 50
        refl.scatter_(1, idx, logp.gather(1, idx) + big)
    # exact ties: ratio exactly 1, KL argument exactly 0 (abs' kink), log-ratio exactly at the clamp
    if T > 5:
        old[:, 1] = logp[:, 1]
        refl[:, 2] = logp[:, 2]
        logp[:, 4] = -1.0
        old[:, 4] = -21.0  # lp - old = 20 = default log_ratio_clamp exactly
        logp[:, 5] = -1.0
        refl[:, 5] = 19.0  # the k3 argument ref - lp = 20 = default log_ratio_clamp exactly
    if B > 3:
        # a whole row far from the old policy: the GSPO sequence ratio leaves the clamp
        old[3] = logp[3] - 30.0
    conv = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return conv(logp), conv(old), conv(adv), mask.to(DEVICE), conv(refl)


def poison(x, mask, kinds=(math.inf, -math.inf, math.nan)):
    """A copy of x with inf / -inf / NaN at the masked positions."""
    x = x.clone()
    bad = torch.tensor(kinds, dtype=x.dtype, device=x.device).repeat(x.numel() // len(kinds) + 1)
    bad = bad[: x.numel()].view_as(x)
    return torch.where(mask, x, bad)


def reference_run(logp, old, adv, mask, refl, **opts):
    """Reference loss, stats and autograd's dloss/dlogp."""
    lp = logp.detach().clone().requires_grad_(True)
    loss, stats = ref.grpo_loss(lp, old, adv, mask, refl, **opts)
    loss.backward()
    return loss.detach(), stats, lp.grad


def kernel_run(logp, old, adv, mask, refl, *, out=None, _config=None, **opts):
    """The kernel plus the little host-side glue rlvrw.ops adds: loss, stats, dlogp."""
    o = dict(
        clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", loss_agg="token-mean",
        num_tokens=None, num_seqs=None, norm_length=None, log_ratio_clamp=20.0, ratio_level="token", dp_size=1,
        count_empty_seqs=False, kl_clamp=10.0, rollout_is_weights=None,
    )
    o.update(opts)
    valid = mask != 0
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lp = logp.to(cdt)
    B, T = lp.shape
    row_scale = ref.aggregation_row_scale(valid, o["loss_agg"], o["num_tokens"], o["num_seqs"], o["norm_length"], cdt,
                                          o["dp_size"], o["count_empty_seqs"])
    adv2 = adv.unsqueeze(1).expand(B, T) if adv.dim() == 1 else adv
    dlogp, rows = K.grpo_token_loss(
        lp, old, adv2, valid, refl, row_scale,
        clip_low=o["clip_low"], clip_high=o["clip_high"], dual_clip=o["dual_clip"], kl_coef=o["kl_coef"],
        kl_type=o["kl_type"], log_ratio_bounds=ref.log_ratio_bounds(o["log_ratio_clamp"]),
        sequence_ratio=o["ratio_level"] == "sequence", kl_clamp=o["kl_clamp"],
        k3_bounds=ref.k3_exponent_bounds(o["kl_clamp"]), rollout_is_weights=o["rollout_is_weights"],
        out=out, _config=_config,
    )
    assert dlogp.dtype == cdt and rows.dtype == cdt and rows.shape == (B, 6)
    loss = (rows[:, 0] + o["kl_coef"] * rows[:, 1]).sum()
    tot = rows.sum(0)
    n = tot[5].clamp(min=1)
    stats = {"pg_loss": tot[0], "kl": tot[1], "clip_frac": tot[2] / n, "clip_frac_lower": tot[3] / n,
             "approx_kl": tot[4] / n}
    return loss, stats, dlogp, rows


def check_against_reference(logp, old, adv, mask, refl, *, rtol=1e-10, atol=1e-12, garbage=True, _config=None,
                            **opts):
    """Kernel (on inputs with garbage at masked positions) vs the reference (on the clean inputs)."""
    r_loss, r_stats, r_grad = reference_run(logp, old, adv, mask, refl, **opts)
    if garbage:
        logp, old = poison(logp, mask), poison(old, mask)
        refl = poison(refl, mask) if refl is not None else None
        adv = poison(adv, mask) if adv.dim() == 2 else adv
    k_loss, k_stats, k_grad, rows = kernel_run(logp, old, adv, mask, refl, _config=_config, **opts)
    assert torch.isfinite(rows).all() and torch.isfinite(k_grad).all()
    assert (k_grad[~mask] == 0).all()
    torch.testing.assert_close(k_grad, r_grad.to(k_grad.dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(k_loss, r_loss.to(k_loss.dtype), rtol=rtol, atol=atol)
    for name in ("pg_loss", "kl", "approx_kl"):
        torch.testing.assert_close(k_stats[name], r_stats[name].to(k_loss.dtype), rtol=rtol, atol=atol, msg=name)
    for name in ("clip_frac", "clip_frac_lower"):  # counts: exact
        torch.testing.assert_close(k_stats[name], r_stats[name].to(k_loss.dtype), rtol=1e-12, atol=0, msg=name)
    # the valid-token count is exact
    assert rows[:, 5].tolist() == mask.sum(1).tolist()
    return k_grad, rows


# ---------------------------------------------------------------------------------------------------------------------
# grpo_token_loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_kl_ratio_dual_float64(kl_type, dual_clip, ratio_level):
    i = KL_TYPES.index(kl_type)
    loss_agg = LOSS_AGGS[(i + (dual_clip is not None)) % len(LOSS_AGGS)]
    per_token = i % 2 == 1
    logp, old, adv, mask, refl = make_batch(6, 77, seed=i, per_token_adv=per_token)
    check_against_reference(
        logp, old, adv, mask, refl, kl_type=kl_type, kl_coef=0.1, dual_clip=dual_clip, ratio_level=ratio_level,
        loss_agg=loss_agg, clip_low=0.2, clip_high=0.28,
    )


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_loss_aggregations(loss_agg, per_token_adv):
    logp, old, adv, mask, refl = make_batch(5, 133, seed=7, per_token_adv=per_token_adv)
    check_against_reference(logp, old, adv, mask, refl, loss_agg=loss_agg, kl_coef=0.05, kl_type="k3+")
    # and the global-count variants (a micro-batch of a bigger batch)
    extra = {"token-mean": {"num_tokens": 1000, "dp_size": 4}, "token-sum": {"dp_size": 2},
             "seq-mean-token-sum": {"num_seqs": 16}, "seq-mean-token-mean": {"num_seqs": 16, "dp_size": 3},
             "seq-mean-token-sum-norm": {"norm_length": 256, "count_empty_seqs": True}}[loss_agg]
    check_against_reference(logp, old, adv, mask, None, loss_agg=loss_agg, dual_clip=2.5, **extra)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_without_ref_and_zero_kl_coef(ratio_level):
    logp, old, adv, mask, refl = make_batch(4, 50, seed=3)
    # no reference: kl stat 0, no KL gradient
    _, rows = check_against_reference(logp, old, adv, mask, None, ratio_level=ratio_level, clip_high=0.28)
    assert (rows[:, 1] == 0).all()
    # reference given but kl_coef = 0: the KL statistic is reported, its gradient is not applied
    _, rows = check_against_reference(logp, old, adv, mask, refl, ratio_level=ratio_level, kl_coef=0.0, kl_type="k2")
    assert (rows[:, 1] != 0).any()


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_small_log_ratio_clamp(ratio_level):
    logp, old, adv, mask, refl = make_batch(6, 64, seed=11)
    # exactly on the clamp 0.25: log-ratio +-0.25 (clamp's gradient is inclusive); the k3 estimate exactly on a
    # small kl_clamp, and past it
    logp[:, 10:14] = -1.0
    old[:, 10], old[:, 11], refl[:, 12], refl[:, 13] = -1.25, -0.75, -0.75, -1.25
    kl_clamp = math.exp(0.25) - 0.25 - 1  # k3 at ref - lp = 0.25
    for kl_type in ("k3", "k3+", "abs"):
        check_against_reference(
            logp, old, adv, mask, refl, log_ratio_clamp=0.25, kl_type=kl_type, kl_coef=0.3, dual_clip=1.5,
            ratio_level=ratio_level, kl_clamp=kl_clamp,
        )
    check_against_reference(logp, old, adv, mask, refl, log_ratio_clamp=(-0.25, math.inf), kl_clamp=math.inf,
                            kl_type="k3", kl_coef=0.3, ratio_level=ratio_level)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_long_rows_several_blocks(ratio_level):
    # T > the 1024-token tile and not a multiple of it
    logp, old, adv, mask, refl = make_batch(3, 2500, seed=5, per_token_adv=True)
    check_against_reference(
        logp, old, adv, mask, refl, kl_type="k3", kl_coef=0.02, dual_clip=3.0, ratio_level=ratio_level,
        loss_agg="seq-mean-token-mean", clip_high=0.28,
    )


def test_many_short_rows():
    # the heuristic packs short rows several per program once there are many rows
    assert K._token_loss_config(600, 9, 8)[0] > 1 and K._token_loss_config(4096, 100, 4)[0] > 1
    # several rows per program (B not a multiple of BLOCK_B) and several small tiles per row, forced
    logp, old, adv, mask, refl = make_batch(19, 77, seed=13)
    for config in ((8, 16, 1), (4, 32, 1)):
        for ratio_level in ("token", "sequence"):
            check_against_reference(logp, old, adv, mask, refl, kl_type="k1", kl_coef=0.1, dual_clip=3.0,
                                    loss_agg="token-mean", ratio_level=ratio_level, _config=config)


def test_fully_masked_and_degenerate_shapes():
    logp, old, adv, mask, refl = make_batch(4, 30, seed=17)
    mask[:] = False
    for ratio_level in ("token", "sequence"):
        grad, rows = check_against_reference(
            logp, old, adv, mask, refl, kl_coef=0.1, ratio_level=ratio_level, loss_agg="seq-mean-token-mean"
        )
        assert (grad == 0).all() and (rows == 0).all()
    # T = 0 and T = 1
    for T in (0, 1):
        logp, old, adv, mask, refl = make_batch(3, T, seed=19, huge=False)
        grad, rows = kernel_run(logp, old, adv, mask, refl, kl_coef=0.1)[2:]
        assert grad.shape == (3, T) and torch.isfinite(rows).all()
        if T:
            check_against_reference(logp, old, adv, mask, refl, kl_coef=0.1, ratio_level="sequence")


def test_garbage_at_masked_positions_float64():
    logp, old, adv, mask, refl = make_batch(6, 90, seed=23, per_token_adv=True)
    for kinds in ((math.inf,), (-math.inf,), (math.nan,), (math.inf, -math.inf, math.nan)):
        for ratio_level in ("token", "sequence"):
            lp_bad, old_bad = poison(logp, mask, kinds), poison(old, mask, kinds)
            ref_bad, adv_bad = poison(refl, mask, kinds), poison(adv, mask, kinds)
            r_loss, r_stats, r_grad = reference_run(logp, old, adv, mask, refl, kl_coef=0.1, dual_clip=3.0,
                                                    ratio_level=ratio_level)
            k_loss, k_stats, k_grad, rows = kernel_run(lp_bad, old_bad, adv_bad, mask, ref_bad, kl_coef=0.1,
                                                       dual_clip=3.0, ratio_level=ratio_level)
            assert torch.isfinite(k_grad).all() and torch.isfinite(rows).all()
            torch.testing.assert_close(k_grad, r_grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(k_loss, r_loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("kl_type", ["k3", "k1+", "abs"])
def test_float32_with_bf16_old_and_ref(kl_type, ratio_level):
    logp, old, adv, mask, refl = make_batch(6, 100, seed=29, dtype=torch.float32)
    old, refl = old.to(torch.bfloat16), refl.to(torch.bfloat16)
    check_against_reference(
        logp, old, adv, mask, refl, kl_type=kl_type, kl_coef=0.1, dual_clip=3.0, clip_high=0.28,
        ratio_level=ratio_level, rtol=2e-5, atol=1e-6,
    )


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_float32_long_rows(ratio_level):
    logp, old, adv, mask, refl = make_batch(3, 2100, seed=47, dtype=torch.float32, per_token_adv=True)
    check_against_reference(logp, old.to(torch.bfloat16), adv, mask, refl.to(torch.bfloat16), kl_type="k3",
                            kl_coef=0.1, dual_clip=3.0, ratio_level=ratio_level, loss_agg="seq-mean-token-sum-norm",
                            rtol=2e-5, atol=1e-6)


def test_float32_per_token_advantages_in_bf16():
    logp, old, adv, mask, refl = make_batch(5, 70, seed=31, dtype=torch.float32, per_token_adv=True)
    check_against_reference(logp, old, adv.to(torch.bfloat16), mask, refl.to(torch.float16), kl_type="k2",
                            kl_coef=0.2, rtol=2e-5, atol=1e-6)


def test_strided_inputs_and_poisoned_out():
    B, T = 5, 61
    logp, old, adv, mask, refl = make_batch(B, T, seed=37, per_token_adv=True)
    r_loss, _, r_grad = reference_run(logp, old, adv, mask, refl, kl_coef=0.1, dual_clip=3.0, loss_agg="token-mean")

    def widen(x, fill):
        wide = torch.full((B, T + 9), fill, dtype=x.dtype, device=DEVICE)
        wide[:, 3:3 + T] = x
        return wide[:, 3:3 + T]

    lp_s = widen(poison(logp, mask), math.nan)
    old_s, ref_s = widen(poison(old, mask), math.nan), widen(poison(refl, mask), math.inf)
    adv_s = widen(poison(adv, mask), math.nan)
    mask_s = widen(mask, True)
    assert lp_s.stride(0) == T + 9 and not mask_s.is_contiguous()
    out_wide = torch.full((B, T + 4), math.nan, dtype=torch.float64, device=DEVICE)
    out = out_wide[:, 2:2 + T]
    k_loss, _, k_grad, rows = kernel_run(lp_s, old_s, adv_s, mask_s, ref_s, out=out, kl_coef=0.1, dual_clip=3.0)
    assert k_grad.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()
    assert torch.isnan(out_wide[:, :2]).all() and torch.isnan(out_wide[:, 2 + T:]).all()  # untouched
    torch.testing.assert_close(out, r_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-10, atol=1e-12)


def test_column_strided_inputs_and_out():
    # token stride != 1 everywhere (transposed storage)
    B, T = 4, 45
    logp, old, adv, mask, refl = make_batch(B, T, seed=39, per_token_adv=True)
    r_loss, _, r_grad = reference_run(logp, old, adv, mask, refl, kl_coef=0.1, kl_type="abs", ratio_level="sequence")
    tr = lambda x: x.t().contiguous().t()  # noqa: E731
    out = torch.full((T, B), math.nan, dtype=torch.float64, device=DEVICE).t()
    args = [tr(poison(x, mask)) for x in (logp, old, adv)] + [tr(mask), tr(poison(refl, mask))]
    assert args[0].stride() == (1, B)
    k_loss, _, k_grad, _ = kernel_run(*args, out=out, kl_coef=0.1, kl_type="abs", ratio_level="sequence")
    torch.testing.assert_close(out, r_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-10, atol=1e-12)


def test_valid_mask_from_expanded_and_int_mask():
    B, T = 4, 40
    logp, old, adv, mask, refl = make_batch(B, T, seed=41, huge=False)
    lengths = torch.tensor([40, 17, 0, 33], device=DEVICE)
    mask = torch.arange(T, device=DEVICE)[None, :] < lengths[:, None]
    r = reference_run(logp, old, adv, mask, refl, kl_coef=0.1)
    # bool, int and float masks; advantages as an expanded (B, T) view or as (B,) directly
    for m, a in ((mask, adv[:, None].expand(B, T)), (mask.to(torch.int32), adv), (mask.to(torch.float32), adv)):
        valid = m != 0
        cdt = torch.float64
        row_scale = ref.aggregation_row_scale(valid, "token-mean", dtype=cdt)
        dlogp, rows = K.grpo_token_loss(
            logp, old, a, m, refl, row_scale, clip_low=0.2, clip_high=0.2, dual_clip=None,
            kl_coef=0.1, kl_type="k3", log_ratio_bounds=(-20.0, 20.0), sequence_ratio=False,
        )
        torch.testing.assert_close(dlogp, r[2], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((rows[:, 0] + 0.1 * rows[:, 1]).sum(), r[0], rtol=1e-10, atol=1e-12)


def test_tie_splitting_matches_autograd():
    # A = 0 everywhere: every max/min is a tie; a ratio exactly on the clip bound (log-ratio 0 -> ratio 1 with
    # clip_low = 0): autograd's clamp passes the gradient there and the maximum's tie splits it 0.5 / 0.5.
    B, T = 3, 20
    logp, old, adv, mask, refl = make_batch(B, T, seed=43, huge=False)
    old[:, :10] = logp[:, :10]
    adv = torch.tensor([-0.7, 0.0, 0.9], dtype=torch.float64, device=DEVICE)
    for dual in (None, 1.0, 1.0 + 1e-9):  # 1.0: pg ties with the dual cap at ratio 1 (the kernel allows c3 = 1)
        for clip_low in (0.0, 0.2):
            check_against_reference(logp, old, adv, mask, refl, clip_low=clip_low, clip_high=0.0, dual_clip=dual)


# ---------------------------------------------------------------------------------------------------------------------
# group advantages
# ---------------------------------------------------------------------------------------------------------------------


def make_rewards(n_groups, G, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups, G, generator=g, dtype=torch.float64)
    r[1::3] = torch.randint(0, 2, (r[1::3].shape), generator=g).to(torch.float64)  # 0/1 rewards, as in RLVR
    r[0] = 1.0  # a constant group: std treated as the constant 0
    if n_groups > 2:
        r[2] = 0.5
    return r.reshape(-1).to(DEVICE, dtype)


TOLS = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6)}
GRAD_TOLS = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("G", [1, 3, 16, 17])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale, G, dtype):
    n_groups = 7
    rewards = make_rewards(n_groups, G, seed=G, dtype=dtype)
    adv = K.group_advantages(rewards, G, 1e-6, scale)
    expected = ref.group_advantages(rewards, G, 1e-6, scale)
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol, atol = TOLS[dtype]
    torch.testing.assert_close(adv, expected, rtol=rtol, atol=atol)
    if G == 1:
        assert (adv == 0).all()
    if scale == "group":
        assert (adv.view(n_groups, G)[0] == 0).all()

    # backward vs autograd of the reference
    g = torch.Generator().manual_seed(100 + G)
    grad_adv = torch.randn(n_groups * G, generator=g, dtype=adv.dtype).to(DEVICE)
    r = rewards.detach().clone().requires_grad_(True)
    ref.group_advantages(r, G, 1e-6, scale).backward(grad_adv)
    grad = K.group_advantages_backward(grad_adv, rewards, G, 1e-6, scale)
    assert grad.dtype == rewards.dtype
    rtol, atol = GRAD_TOLS[dtype]
    torch.testing.assert_close(grad, r.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_all_constant_and_large_groups(scale):
    for rewards, G in ((torch.ones(24, dtype=torch.float64, device=DEVICE), 4),
                       (make_rewards(3, 1000, 1, torch.float64), 1000),
                       (make_rewards(2, 4096, 2, torch.float32), 4096)):
        adv = K.group_advantages(rewards, G, 1e-6, scale)
        torch.testing.assert_close(adv, ref.group_advantages(rewards, G, 1e-6, scale), rtol=1e-5, atol=1e-6)
        grad_adv = torch.linspace(-1, 1, rewards.numel(), dtype=adv.dtype, device=DEVICE)
        r = rewards.detach().clone().requires_grad_(True)
        ref.group_advantages(r, G, 1e-6, scale).backward(grad_adv)
        grad = K.group_advantages_backward(grad_adv, rewards, G, 1e-6, scale)
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, r.grad, rtol=1e-4, atol=1e-5)


def test_group_advantages_backward_strided_grad():
    rewards = make_rewards(5, 6, 3, torch.float64)
    wide = torch.randn(60, dtype=torch.float64, device=DEVICE)
    grad_adv = wide[::2]
    for scale in ("group", "batch", "none"):
        r = rewards.clone().requires_grad_(True)
        ref.group_advantages(r, 6, 1e-6, scale).backward(grad_adv)
        grad = K.group_advantages_backward(grad_adv, rewards, 6, 1e-6, scale)
        torch.testing.assert_close(grad, r.grad, rtol=1e-10, atol=1e-12)


class _GroupAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size, eps, scale):
        ctx.save_for_backward(rewards)
        ctx.args = (group_size, eps, scale)
        return K.group_advantages(rewards, group_size, eps, scale)

    @staticmethod
    def backward(ctx, grad_adv):
        (rewards,) = ctx.saved_tensors
        return K.group_advantages_backward(grad_adv, rewards, *ctx.args), None, None, None


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_gradcheck(scale):
    g = torch.Generator().manual_seed(5)
    for G in (1, 3, 5):
        rewards = torch.randn(4 * G, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
        assert torch.autograd.gradcheck(lambda r: _GroupAdvantages.apply(r, G, 1e-3, scale), (rewards,))


def test_empty_inputs():
    empty = torch.empty(0, dtype=torch.float32, device=DEVICE)
    assert K.group_advantages(empty, 4, 1e-6, "batch").shape == (0,)
    assert K.group_advantages_backward(empty, empty, 4, 1e-6, "group").shape == (0,)
    lp = torch.empty(0, 8, dtype=torch.float32, device=DEVICE)
    dlogp, rows = K.grpo_token_loss(
        lp, lp, lp, lp.bool(), None, torch.empty(0, device=DEVICE), clip_low=0.2, clip_high=0.2, dual_clip=None,
        kl_coef=0.0, kl_type="k3", log_ratio_bounds=(-20.0, 20.0), sequence_ratio=False,
    )
    assert dlogp.shape == (0, 8) and rows.shape == (0, 6)


def test_configs_cover_heuristics():
    for B, T in itertools.product((1, 7, 256, 5000), (1, 9, 100, 1024, 1025, 4096)):
        for element_size in (4, 8):
            block_b, block_t, num_warps = K._token_loss_config(B, T, element_size)
            assert block_t & (block_t - 1) == 0 and 16 <= block_t <= 1024 and block_b * block_t <= 1024
            assert 1 <= num_warps <= 8 and block_b >= 1
    for n_groups, G in itertools.product((1, 3, 100), (1, 3, 17, 1024, 4096)):
        block_n, block_g, num_warps = K._group_config(n_groups, G)
        assert block_g >= G and block_n >= 1 and 1 <= num_warps <= 8
