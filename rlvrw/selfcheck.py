"""Run every op on small random inputs on every backend this machine has; print error against the float64
reference and time. ``rlvrw selfcheck`` (or ``python -m rlvrw.selfcheck``) exits non-zero if an error is too large.

On a machine without a GPU the Triton kernels run in Triton's interpreter (slow, but it proves them correct here).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
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

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _case_inputs(device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 3, 7, 1031, 32  # V not a multiple of any block size; small: the CPU runs Triton interpreted

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    logp = -torch.rand(B, T, generator=g, dtype=torch.float64).to(device) * 3
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    mask[-1] = False  # a fully masked row
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
        # frames: 2 groups of 4 predictions and their 2 ground truths, 13 x 17 (not a multiple of any block)
        "frames": torch.rand(8, 3, 13, 17, generator=g, dtype=torch.float64).to(device),
        "truth": torch.rand(2, 3, 13, 17, generator=g, dtype=torch.float64).to(device),
    }


def _cases() -> dict[str, tuple[Callable, list[str]]]:
    """op name -> (function(inputs, backend=...) returning a scalar to differentiate, differentiable input names)."""
    loss_opts = dict(kl_coef=1e-3, dual_clip=3.0, clip_high=0.28)
    return {
        "token_logprobs": (
            lambda x, **kw: sum(t.sum() for t in ops.token_logprobs(x["logits"], x["tokens"], 0.9, True, **kw)),
            ["logits"],
        ),
        "linear_token_logprobs": (
            lambda x, **kw: ops.linear_token_logprobs(x["hidden"], x["weight"], x["tokens"], chunk_rows=8, **kw).sum(),
            ["hidden", "weight"],
        ),
        "group_advantages": (
            lambda x, **kw: (ops.group_advantages(x["rewards"], 16, **kw) * torch.arange(64, device=x["rewards"].device)).sum(),
            ["rewards"],
        ),
        "frame_reward": (
            lambda x, **kw: (ops.frame_reward(x["frames"], x["truth"], 4, "mse+0.5*ssim+0.01*psnr", **kw)
                             * torch.arange(8, device=x["frames"].device)).sum(),
            ["frames"],
        ),
        "grpo_loss": (
            lambda x, **kw: ops.grpo_loss(
                x["logp"], x["old_logp"], x["advantages"], x["mask"], x["ref_logp"], **loss_opts, **kw
            )[0],
            ["logp"],
        ),
        "grpo_loss_from_logits": (
            lambda x, **kw: ops.grpo_loss_from_logits(
                x["logits"], x["tokens"], x["old_logp"], x["advantages"], x["mask"], x["ref_logp"], 0.9,
                inplace_backward=False, **loss_opts, **kw,
            )[0],
            ["logits"],
        ),
    }


def _run(fn, inputs, grad_names, dtype, backend):
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    for name in grad_names:
        x[name] = x[name].detach().requires_grad_(True)
    out = fn(x, backend=backend)
    out.backward()
    return out.detach().double(), [x[name].grad.double() for name in grad_names]


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


def run(dtypes=(torch.float32, torch.bfloat16), repeats: int = 3) -> list[dict]:
    """One row per (op, backend, dtype). Interpreted Triton is timed once: its time says nothing about a GPU."""
    rows = []
    cases = _cases()
    for backend, device in available_backends():
        inputs = _case_inputs(device, torch.float64)
        for op, (fn, grad_names) in cases.items():
            if backend == "cuda" and op not in _backend.CUDA_OPS:
                continue
            expected, expected_grads = _run(fn, inputs, grad_names, torch.float64, "reference")
            for dtype in dtypes:
                try:
                    value, grads = _run(fn, inputs, grad_names, dtype, backend)
                    # rounding the inputs to dtype is part of the error; relative to the largest expected value
                    err = max(
                        float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                        for a, b in zip([value] + grads, [expected] + expected_grads)
                    )
                    if device == "cuda":
                        torch.cuda.synchronize()
                    timed = 1 if device == "cpu" and backend == "triton" else repeats
                    start = time.perf_counter()
                    for _ in range(timed):
                        _run(fn, inputs, grad_names, dtype, backend)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ms = (time.perf_counter() - start) / timed * 1e3
                    ok = err <= TOLERANCE[dtype]
                    rows.append(dict(op=op, backend=backend, device=device, dtype=str(dtype).split(".")[-1],
                                     max_rel_err=err, ms=ms, ok=ok))
                except Exception as exc:  # a broken backend is a result to show, not a crash
                    rows.append(dict(op=op, backend=backend, device=device, dtype=str(dtype).split(".")[-1],
                                     max_rel_err=float("nan"), ms=float("nan"), ok=False,
                                     error=f"{type(exc).__name__}: {exc}"))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':24s} {'backend':10s} {'device':7s} {'dtype':9s} {'max rel err':>12s} {'ms (fwd+bwd)':>13s}  ok"]
    for r in rows:
        lines.append(
            f"{r['op']:24s} {r['backend']:10s} {r['device']:7s} {r['dtype']:9s} {r['max_rel_err']:12.2e} "
            f"{r['ms']:13.2f}  {'yes' if r['ok'] else 'NO'}" + (f"  {r['error']}" if "error" in r else "")
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
