"""Static GPU evidence in CI: every Triton kernel compiled ahead of time for sm_90 and sm_80, no GPU needed.

``bench/static_compile.py`` runs the ops on meta tensors at the benchmark shapes with every launch turned into a
compile for the target; this runs it once (in a fresh process: the kernels here are interpreted) and fails on a
compile error, a register spill or stack frame, fp64 arithmetic in an fp32/bf16 kernel, an fp64 scalar that compiles
as fp32, or logits passes that lose their 16-byte loads and stores. About a minute on 2 cores from a cold Triton
cache, seconds from a warm one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "bench" / "static_compile.py"
TABLE = ROOT / "bench" / "results" / "sm90-static.md"


def _tool():
    """The module, for its PTX readers (importing it compiles nothing)."""
    spec = importlib.util.spec_from_file_location("_rlvrw_static_compile", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _missing_toolchain() -> str | None:
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as err:  # a triton without the NVIDIA backend
        return f"triton's NVIDIA backend is not importable: {err}"
    for tool in ("ptxas", "ptxas_blackwell", "cuobjdump"):
        try:
            path = getattr(knobs.nvidia, tool).path
        except Exception as err:
            return f"triton's bundled {tool} is not usable here: {err}"
        if not path or not os.access(path, os.X_OK):
            return f"triton's bundled {tool} is missing"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    missing = _missing_toolchain()
    if missing:
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(TOOL), "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.is_file(), f"no report (exit {res.returncode}):\n{res.stdout}\n{res.stderr[-5000:]}"
    rep = json.loads(out.read_text())
    rep["returncode"], rep["stdout"] = res.returncode, res.stdout
    return rep


def _rows(rep, kernel=None):
    return [r for r in rep["rows"] if "kernel" in r and (kernel is None or r["kernel"] == kernel)]


def test_every_kernel_compiles_for_sm90_and_sm80_without_spills(report):
    assert not report["problems"], "\n".join(report["problems"])
    assert report["returncode"] == 0, report["stdout"]
    assert {r["target"] for r in _rows(report)} == {"sm_90", "sm_80"}
    for r in _rows(report):
        assert r["registers"] > 0 and r["stack"] == 0 and r["local"] == 0, r


def test_fp64_scalars_compile_as_fp64(report):
    """The compiled signatures: clip bounds, clamp, dual clip, KL coefficient, eps, 1/HW, eps^2, the frame reward's
    1/(3HW), 1/(window count) and SSIM's c1, c2 are fp64; the fp32 kernels convert them once per program and do no
    fp64 arithmetic."""
    expected = {
        "_grpo_token_loss_kernel": ("ratio_lo_arg", "ratio_hi_arg", "lr_lo_arg", "lr_hi_arg", "dual_arg",
                                    "kl_coef_arg", "k3_lo_arg", "k3_hi_arg", "kl_clamp_arg"),
        "_group_advantages_kernel": ("eps_arg",),
        "_group_advantages_backward_kernel": ("eps_arg",),
        "_scale_l1_kernel": ("inv_numel",),
        "_lpips_tail_fwd_kernel": ("inv_hw", "eps2"),
        "_lpips_tail_bwd_kernel": ("inv_hw", "eps2"),
        "_frame_stats_fwd_kernel": ("inv_pix", "inv_win", "c1", "c2"),
        "_frame_stats_bwd_kernel": ("inv_pix", "inv_win", "c1", "c2"),
    }
    for kernel, names in expected.items():
        rows = _rows(report, kernel)
        assert rows, f"{kernel} was not compiled"
        for r in rows:
            assert {n: r["signature"][n] for n in names} == dict.fromkeys(names, "fp64"), kernel
            assert r["f64_arith"] == 0, (kernel, r["config"], r["f64_arith"])
        # (a configuration may not read the scalar at all: group advantages scaled by the batch std ignore eps)
        assert any(r["f64_cvt"] > 0 for r in rows), kernel


@pytest.mark.parametrize("vocab", [4633, 151936])
def test_logits_passes_use_16_byte_vectors(report, vocab):
    """Forward and backward, bf16 and fp32, V = 4633 (a row stride not provably 16-byte aligned) and V = 151936:
    every load and store of the streaming loops is 16 bytes."""
    seen = set()
    for kernel in ("_logits_forward_kernel", "_logits_backward_kernel"):
        for r in _rows(report, kernel):
            if not any(f"V={vocab} " in case for case in r["cases"]):
                continue
            widths = re.findall(r"(\d+)Bx\d+", r["streaming"])
            assert widths and set(widths) == {"16"}, (kernel, r["dtype"], r["streaming"])
            seen.add((r["target"], kernel, r["dtype"]))
    assert len(seen) == 2 * 2 * 2, sorted(seen)


def test_committed_table_is_current(report):
    """bench/results/sm90-static.md is what `python bench/static_compile.py --write` writes now (compile times
    aside): rerun it after changing a kernel or its launch configuration."""
    import triton

    if f"triton {triton.__version__}," not in TABLE.read_text():
        pytest.skip(f"the table was written with another triton than {triton.__version__}")
    tool = _tool()
    fresh = tool.markdown(report)
    times = re.compile(re.escape(tool.TIMES) + r"(sm_\d+ [\d.]+ s(, )?)+\.")
    assert times.sub("", TABLE.read_text()) == times.sub("", fresh), (
        "bench/results/sm90-static.md is stale: run python bench/static_compile.py --write"
    )


def test_ptx_reader():
    """Access widths and their source lines, also inside multi-line inline asm (where LLVM numbers each asm line on
    from the first .loc), and fp64 arithmetic told apart from conversions."""
    tool = _tool()
    ptx = """
\t.loc\t1 77 13                         // logprobs.py:77:13
\t@%p2 ld.global.b16 { %rs1 }, [ %rd15 + 0 ];
\t// begin inline asm
\t.loc\t1 92 12, function_name $L__info_string0, inlined_at 1 155 13 // logprobs.py:92:12
\tmov.u32 %r131, %r135;
\t.loc\t1 93 12, function_name $L__info_string0, inlined_at 1 155 13 // logprobs.py:93:12
\t@%p16 ld.global.v4.b32 { %r131, %r132, %r133, %r134 }, [ %rd50 + 0 ];
\t// end inline asm
\t.loc\t1 101 5                         // logprobs.py:101:5
\t@!%p3 st.global.v2.b64 [ %rd1 + 0 ], { %rd2, %rd3 };
\tst.global.L1::evict_last.b8 [ %rd4 + 0 ], { %rs5 };
\tcvt.rn.f32.f64 %f1, %fd1;
\tfma.rn.f64 %fd2, %fd1, %fd1, %fd1;
\t@%p1 setp.lt.f64 %p4, %fd2, %fd1;
"""
    assert tool.ptx_accesses(ptx) == [
        ("ld", 2, "logprobs.py", 77), ("ld", 16, "logprobs.py", 92), ("st", 16, "logprobs.py", 101),
        ("st", 1, "logprobs.py", 101),
    ]
    lines = ptx.splitlines()
    assert sum(bool(tool._F64_ARITH.match(line)) for line in lines) == 2
    assert sum(bool(tool._F64_CVT.match(line)) for line in lines) == 1
