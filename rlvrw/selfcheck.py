"""Run every op on small random inputs on every backend this machine has; print each one's error against the float64
reference, its tolerance and its time. ``rlvrw`` (or ``rlvrw selfcheck``, ``python -m rlvrw.selfcheck``) exits
non-zero when an error is over its tolerance, is NaN, or an op raises.

Ops: the GRPO family (token_logprobs, linear_token_logprobs, group_advantages, grpo_loss, grpo_loss_from_logits),
FSQ (fsq_quantize, fsq_codes_to_indices, fsq_indices_to_codes, fsq_dequantize), group_norm_silu,
``FrameTokenizer.decode_fast`` (the FSQ gather and fused GroupNorm + SiLU inside a small decoder, against the plain
float64 decoder) and l1_lpips_reward (LPIPS-AlexNet with random weights: the check is of the op, not of the weights;
AlexNet is the cheapest backbone on a CPU).
Each runs in float32 and bfloat16; the reference sees the same inputs rounded to that dtype, upcast to float64, so
the error is the backend's own (plus the rounding of its outputs). Gradients are compared too: of the scalar
``sum(output * w)`` for a fixed pattern ``w``. Integer outputs (FSQ indices) must match exactly.

On a machine without a GPU the Triton kernels run in Triton's interpreter (slow, but it proves them correct here).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

# Before anything imports rlvrw.kernels: without a GPU, Triton kernels can only run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter evaluates both branches of tl.where in numpy; the discarded one may overflow. Not our results.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

import rlvrw.ops as ops  # noqa: E402
from rlvrw import reference  # noqa: E402
from rlvrw.ops import _backend  # noqa: E402
from rlvrw.reference.precision import full_fp32  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
FSQ_LEVELS = (7, 5, 5, 5, 5)  # the paper's 4375 codes
GROUP_SIZE = 2  # l1_lpips_reward's group


@dataclass
class Case:
    """One op. ``run(x, dtype, backend)`` returns a tensor or a tuple of tensors from the inputs ``x`` (floating
    inputs already in ``dtype``); ``expected(x64)`` is the float64 reference (default: ``run`` at float64 on the
    reference backend). ``grads``: inputs whose gradients are compared. ``backends``: those that implement it."""

    run: Callable
    grads: list[str] = field(default_factory=list)
    expected: Callable | None = None
    backends: tuple[str, ...] = ("reference", "triton", "cuda")
    tolerance: dict = field(default_factory=lambda: dict(TOLERANCE))


@contextlib.contextmanager
def _backend_env(name: str):
    """RLVRW_BACKEND=name for calls that take no ``backend=`` (decode_fast runs several ops)."""
    old = os.environ.get(_backend.ENV_VAR)
    os.environ[_backend.ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_backend.ENV_VAR, None)
        else:
            os.environ[_backend.ENV_VAR] = old


def _models(device: str) -> dict:
    """A small decoder and an LPIPS-AlexNet, with fixed random weights, in float32 and float64."""
    from rlvrw.models import LPIPS, FrameTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # few GroupNorm groups and one frame: interpreted Triton runs one program per (frame, group)
        tokenizer = FrameTokenizer(channels=(8, 16), layers_per_block=1, latent_channels=8, levels=FSQ_LEVELS,
                                   num_groups=2).eval()
        lpips = LPIPS("alex", random_weights=True)
    tokenizer, lpips = tokenizer.to(device), lpips.to(device)
    return {"tokenizer": tokenizer, "tokenizer64": _double_copy(tokenizer), "lpips": lpips,
            "lpips64": _double_copy(lpips)}


def _double_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).double()


def _case_inputs(device: str) -> dict:
    """Float64 inputs (and integer ids) of every case, on ``device``."""
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 3, 7, 1031, 32  # V not a multiple of any block size; small: the CPU runs Triton interpreted

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    logp = -torch.rand(B, T, generator=g, dtype=torch.float64).to(device) * 3
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    mask[-1] = False  # a fully masked row
    z = randn(3, 37, len(FSQ_LEVELS), scale=1.5)
    codes, _ = reference.fsq_quantize(z, FSQ_LEVELS)
    size = math.prod(FSQ_LEVELS)
    frames = torch.rand(GROUP_SIZE * 2, 3, 32, 32, generator=g, dtype=torch.float64)  # AlexNet needs 31x31
    return {
        "logits": randn(B, T, V, scale=2.0),
        "tokens": torch.randint(0, V, (B, T), generator=g).to(device),
        "hidden": randn(B, T, H),
        "weight": randn(V, H, scale=0.2),
        "logp": logp,
        "old_logp": logp + randn(B, T, scale=0.5),
        "ref_logp": logp + randn(B, T, scale=0.5),
        "advantages": randn(B),
        "mask": mask,
        "rewards": randn(4 * 16),
        "z": z,
        "codes": codes,
        "indices": torch.randint(0, size, (5, 41), generator=g).to(device),
        "dq_weight": randn(12, len(FSQ_LEVELS), 1, 1, scale=0.5),  # the tokenizer's 1x1 conv
        "dq_bias": randn(12),
        "gn_x": randn(2, 16, 5, 7, scale=2.0).add_(0.5).contiguous(memory_format=torch.channels_last),
        "gn_weight": randn(16).add_(1.0),
        "gn_bias": randn(16, scale=0.5),
        "ids": torch.randint(0, size, (1, 4, 4), generator=g).to(device),  # an 8x8 frame from the small decoder
        "pred": (frames * 0.8 + 0.1).to(device),
        "target": torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64).to(device),
        # frames: 2 groups of 4 predictions and their 2 ground truths, 13 x 17 (not a multiple of any block)
        "frames": torch.rand(8, 3, 13, 17, generator=g, dtype=torch.float64).to(device),
        "truth": torch.rand(2, 3, 13, 17, generator=g, dtype=torch.float64).to(device),
    }


def _cases(models: dict) -> dict[str, Case]:
    loss_opts = dict(kl_coef=1e-3, dual_clip=3.0, clip_high=0.28)
    cuda_ops = lambda op: ("reference", "triton") + (("cuda",) if op in _backend.CUDA_OPS else ())  # noqa: E731

    def decode_fast(x, dtype, backend):
        with _backend_env(backend):
            return models["tokenizer"].decode_fast(x["ids"], dtype=dtype)

    def reward(x, dtype, backend):
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]
        lpips = models["lpips64"] if dtype == torch.float64 else models["lpips"]
        return ops.l1_lpips_reward(x["pred"], x["target"], GROUP_SIZE, lpips, 0.7, 1.3, precision=precision,
                                   backend=backend)

    return {
        "token_logprobs": Case(
            lambda x, dt, b: ops.token_logprobs(x["logits"], x["tokens"], 0.9, True, backend=b),
            ["logits"], backends=cuda_ops("token_logprobs"),
        ),
        "linear_token_logprobs": Case(
            lambda x, dt, b: ops.linear_token_logprobs(x["hidden"], x["weight"], x["tokens"], chunk_rows=8, backend=b),
            ["hidden", "weight"], backends=cuda_ops("linear_token_logprobs"),
        ),
        "group_advantages": Case(
            lambda x, dt, b: ops.group_advantages(x["rewards"], 16, backend=b), ["rewards"],
            backends=cuda_ops("group_advantages"),
        ),
        "frame_reward": Case(
            lambda x, dt, b: (ops.frame_reward(x["frames"], x["truth"], 4, "mse+0.5*ssim+0.01*psnr", backend=b)
                              * torch.arange(8, device=x["frames"].device)).sum(),
            ["frames"], backends=cuda_ops("frame_reward"),
        ),
        "grpo_loss": Case(
            lambda x, dt, b: ops.grpo_loss(
                x["logp"], x["old_logp"], x["advantages"], x["mask"], x["ref_logp"], **loss_opts, backend=b
            )[0],
            ["logp"], backends=cuda_ops("grpo_loss"),
        ),
        "grpo_loss_from_logits": Case(
            lambda x, dt, b: ops.grpo_loss_from_logits(
                x["logits"], x["tokens"], x["old_logp"], x["advantages"], x["mask"], x["ref_logp"], 0.9,
                inplace_backward=False, **loss_opts, backend=b,
            )[0],
            ["logits"], backends=cuda_ops("grpo_loss_from_logits"),
        ),
        "fsq_quantize": Case(
            lambda x, dt, b: ops.fsq_quantize(x["z"], FSQ_LEVELS, backend=b), ["z"],
            backends=cuda_ops("fsq_quantize"),
        ),
        "fsq_codes_to_indices": Case(
            lambda x, dt, b: ops.fsq_codes_to_indices(x["codes"], FSQ_LEVELS, backend=b),
            backends=cuda_ops("fsq_codes_to_indices"),
        ),
        "fsq_indices_to_codes": Case(
            lambda x, dt, b: ops.fsq_indices_to_codes(x["indices"], FSQ_LEVELS, dt, backend=b),
            backends=cuda_ops("fsq_indices_to_codes"),
        ),
        "fsq_dequantize": Case(
            lambda x, dt, b: ops.fsq_dequantize(x["indices"], FSQ_LEVELS, x["dq_weight"], x["dq_bias"], backend=b),
            ["dq_weight", "dq_bias"], backends=cuda_ops("fsq_dequantize"),
        ),
        "group_norm_silu": Case(
            lambda x, dt, b: ops.group_norm_silu(x["gn_x"], 4, x["gn_weight"], x["gn_bias"], backend=b),
            ["gn_x", "gn_weight", "gn_bias"], backends=cuda_ops("group_norm_silu"),
        ),
        # every backend runs the ops it has (RLVRW_BACKEND=cuda: the FSQ gather in CUDA, GroupNorm + SiLU in Triton)
        "decode_fast": Case(decode_fast, expected=lambda x: models["tokenizer64"].decode(x["ids"])),
        # bf16: the gradient comes back through a bf16 AlexNet (about 5e-2 of its largest element here); the reward
        # itself is within 1e-4, and the float32 rows check the fused kernels to 1e-6
        "l1_lpips_reward": Case(
            reward, ["pred"], backends=cuda_ops("l1_lpips_reward"), tolerance={**TOLERANCE, torch.bfloat16: 1e-1},
            expected=lambda x: reference.l1_lpips_reward(x["pred"], x["target"], GROUP_SIZE, models["lpips64"],
                                                         0.7, 1.3),
        ),
    }


def _pattern(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fixed, varied weight for each element of an output, what its gradient is taken against: representable in
    ``dtype``, so that the reference and the backend get the same upstream gradient."""
    pattern = torch.cos(torch.arange(t.numel(), dtype=torch.float64, device=t.device) * 0.7).view(t.shape)
    return pattern.to(dtype).double()


def _evaluate(case: Case, inputs: dict, dtype: torch.dtype, backend: str, expected: Callable | None = None,
              grad_dtype: torch.dtype | None = None):
    """(outputs, gradients) of ``case`` on ``inputs`` cast to ``dtype``, as float64 (integer outputs kept); the
    upstream gradient is representable in ``grad_dtype`` (default ``dtype``)."""
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    for name in case.grads:
        x[name] = x[name].detach().requires_grad_(True)
    out = expected(x) if expected is not None else case.run(x, dtype, backend)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    differentiable = [o for o in outs if o.requires_grad]
    if case.grads:
        sum((o.double() * _pattern(o, grad_dtype or dtype)).sum() for o in differentiable).backward()
    outs = [o.detach().double() if o.is_floating_point() else o.detach() for o in outs]
    return outs, [x[name].grad.double() for name in case.grads]


def _error(got, want) -> tuple[float, str]:
    """The largest error relative to the largest expected value over all outputs and gradients; integer outputs
    must match exactly (any mismatch is an infinite error, and the note says how many)."""
    worst, notes = 0.0, []
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf"), f"shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if not b.is_floating_point():
            wrong = int((a != b).sum())
            if wrong:
                worst = float("inf")
                notes.append(f"{wrong} of {b.numel()} integer outputs differ")
            continue
        err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0
        worst = max(worst, err) if not math.isnan(err) else float("nan")
        if math.isnan(worst):
            break
    return worst, "; ".join(notes)


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs runnable here."""
    if torch.cuda.is_available():
        pairs = [("reference", "cuda"), ("triton", "cuda")]
        if _backend.cuda_extension_loaded():
            pairs.append(("cuda", "cuda"))
        return pairs
    pairs = [("reference", "cpu")]
    if _backend.triton_interpreted():
        pairs.append(("triton", "cpu"))
    return pairs


def run(dtypes=(torch.float32, torch.bfloat16), repeats: int = 3, only: set[str] | None = None) -> list[dict]:
    """One row per (op, backend, dtype); ``only`` restricts the ops. A row's time is the mean of ``repeats`` timed
    calls after the checked one; interpreted Triton is timed by the checked call alone (its time says nothing about
    a GPU)."""
    # float32 rows in full float32: TF32 convolutions would put the convolutional ops near 1e-3
    with full_fp32():
        return _run(dtypes, repeats, only)


def _run(dtypes, repeats: int, only: set[str] | None) -> list[dict]:
    rows = []
    models, inputs, cases, expected = {}, {}, {}, {}
    for backend, device in available_backends():
        if device not in models:
            models[device] = _models(device)
            inputs[device] = _case_inputs(device)
            cases[device] = _cases(models[device])
        for op, case in cases[device].items():
            if backend not in case.backends or (only is not None and op not in only):
                continue
            for dtype in dtypes:
                row = dict(op=op, backend=backend, device=device, dtype=str(dtype).split(".")[-1],
                           tolerance=case.tolerance[dtype])
                try:
                    key = (device, op, dtype)
                    if key not in expected:  # the same for every backend
                        rounded = {k: (v.to(dtype).double() if v.is_floating_point() else v)
                                   for k, v in inputs[device].items()}
                        expected[key] = _evaluate(case, rounded, torch.float64, "reference", case.expected, dtype)
                    want = expected[key]
                    _sync(device)
                    start = time.perf_counter()
                    got = _evaluate(case, inputs[device], dtype, backend)
                    _sync(device)
                    seconds = time.perf_counter() - start
                    err, note = _error(got[0] + got[1], want[0] + want[1])
                    timed = 0 if device == "cpu" and backend == "triton" else repeats
                    if timed:
                        start = time.perf_counter()
                        for _ in range(timed):
                            _evaluate(case, inputs[device], dtype, backend)
                        _sync(device)
                        seconds = (time.perf_counter() - start) / timed
                    row.update(max_rel_err=err, ms=seconds * 1e3, ok=err <= case.tolerance[dtype])
                    if note:
                        row["error"] = note
                except Exception as exc:  # a broken backend is a result to show, not a crash
                    row.update(max_rel_err=float("nan"), ms=float("nan"), ok=False,
                               error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':24s} {'backend':10s} {'device':7s} {'dtype':9s} {'max rel err':>12s} {'tolerance':>10s} "
             f"{'ms (fwd+bwd)':>13s}  ok"]
    for r in rows:
        lines.append(
            f"{r['op']:24s} {r['backend']:10s} {r['device']:7s} {r['dtype']:9s} {r['max_rel_err']:12.2e} "
            f"{r['tolerance']:10.0e} {r['ms']:13.2f}  {'yes' if r['ok'] else 'NO'}"
            + (f"  {r['error']}" if "error" in r else "")
        )
    return "\n".join(lines)


def main() -> int:
    print(_backend.format_report())
    print()
    rows = run()
    print(format_table(rows))
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
