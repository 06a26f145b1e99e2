"""Static GPU evidence without a GPU: every Triton kernel compiled ahead of time for sm_90 and sm_80.

The public ops run on meta tensors at the benchmark shapes (``bench/conftest.py`` and the ``bench/test_bench_*.py``
modules) with their usual backend choice replaced by ``triton``; Triton is pointed at a stand-in driver that reports
the target GPU, and every kernel launch becomes a compile only (``warmup=True``), so what gets compiled is exactly
what the ops would launch on that GPU for those shapes: the same launch configuration, the same specialization
(16-byte aligned pointers, strides divisible by 16 or not). ptxas turns each kernel into a cubin (Triton 3.9 uses its
bundled CUDA 13 ``ptxas-blackwell`` for sm_90; its CUDA 12.9 ``ptxas`` rejects that PTX); the bundled ``cuobjdump``
reads registers, stack and local memory back, and the PTX gives the width of every global load and store.

A kernel fails the check on:

* a compile error (at any stage: Triton, LLVM, ptxas);
* a register spill or any local memory (a stack frame, a local array);
* fp64 arithmetic in a kernel whose tensors are fp32/bf16/fp16 (converting an fp64 scalar argument to the compute
  dtype once per program is allowed: that is how the kernels take float64-exact constants);
* a parameter annotated ``tl.float64`` that does not compile as fp64;
* a load or store of the logits narrower than 16 bytes in the logits passes' streaming loops (the ``STREAMING``
  helpers of ``kernels/logprobs.py``).

Usage::

    python bench/static_compile.py            # compile and check; exit status 1 and the problems when any
    python bench/static_compile.py --write    # also write bench/results/sm90-static.md
    python bench/static_compile.py --json F   # the full report as JSON (tests/test_static_compile.py reads it)

Compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a second run only
re-reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TABLE = BENCH / "results" / "sm90-static.md"
TARGETS = (90, 80)  # compute capabilities: H100/H200, A100
TIMES = "Wall time to compile (or read back from Triton's cache) and analyse, on the machine that wrote this: "


# ----------------------------------------------------------------------------------------------------------------------
# Compiling without a device
# ----------------------------------------------------------------------------------------------------------------------


def _static_driver(capability: int):
    """A Triton driver that reports ``capability`` and has no device: enough for JITFunction.run(warmup=True)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StaticDriver(DriverBase):
        target = GPUTarget("cuda", capability, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("compiling ahead of time: there is no device to benchmark on")

        # JITFunction keys its compiled-kernel caches by device: one "device" per target keeps them apart.
        def get_current_device(self):
            return capability

        def get_current_stream(self, device=None):
            return 0

    return StaticDriver()


@contextlib.contextmanager
def compiling_for(capability: int):
    """Within the block, every Triton launch compiles for sm_<capability> instead of running; yields the list that
    collects ``(JITFunction, CompiledKernel)`` per launch."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launched: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append((self, kernel))
        return kernel

    previous = driver._active  # None on a machine without a GPU (reset_active() would then fail)
    driver.set_active(_static_driver(capability))
    JITFunction.run = compile_only
    try:
        yield launched
    finally:
        JITFunction.run = run
        driver._active = previous


# ----------------------------------------------------------------------------------------------------------------------
# The cases: public ops at the benchmark shapes, on meta tensors
# ----------------------------------------------------------------------------------------------------------------------


def _bench_module(name: str):
    """A module of bench/ by file name (bench/ is not a package): its shape constants are the single source."""
    spec = importlib.util.spec_from_file_location(f"_rlvrw_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _tokens(*shape):
    return torch.empty(shape, dtype=torch.long, device="meta")


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _logits_cases(ops, conftest):
    """token_logprobs (with and without entropy, on (B, T, V) logits and on a [:, :-1] slice of (B, T+1, V) ones),
    linear_token_logprobs, grpo_loss_from_logits with RLVR-World's options (its token-loss kernel included), group
    advantages: forward and backward, bf16 and fp32, at the lm (V = 151936) and video (V = 4633) shapes."""
    cases = {}
    for key, s in conftest.FULL_SHAPES.items():
        for dname, dtype in _DTYPES.items():
            tag = f"{key} {s.B}x{s.T} V={s.V} {dname}"

            def token_logprobs(s=s, dtype=dtype):
                for entropy in (False, True):
                    logits = _meta(s.B, s.T, s.V, dtype=dtype, grad=True)
                    out = ops.token_logprobs(logits, _tokens(s.B, s.T), 0.7, entropy, backend="triton")
                    logp, ent = out if entropy else (out, None)
                    (logp.sum() + (ent.sum() if entropy else 0)).backward()

            def sliced_logits(s=s, dtype=dtype):
                full = _meta(s.B, s.T + 1, s.V, dtype=dtype, grad=True)
                ops.token_logprobs(full[:, :-1], _tokens(s.B, s.T), backend="triton").sum().backward()

            def linear(s=s, dtype=dtype):
                hidden, weight = _meta(s.B, s.T, s.H, dtype=dtype, grad=True), _meta(s.V, s.H, dtype=dtype, grad=True)
                ops.linear_token_logprobs(hidden, weight, _tokens(s.B, s.T), backend="triton").sum().backward()

            def grpo(s=s, dtype=dtype):
                full = _meta(s.B, s.T + 1, s.V, dtype=dtype, grad=True)
                loss, _ = ops.grpo_loss_from_logits(
                    full[:, :-1], _tokens(s.B, s.T), _meta(s.B, s.T), _meta(s.B), _meta(s.B, s.T, dtype=torch.bool),
                    _meta(s.B, s.T), backend="triton", **conftest.GRPO_OPTIONS,
                )
                loss.backward()

            cases[f"token_logprobs {tag}"] = token_logprobs
            cases[f"token_logprobs logits[:, :-1] {tag}"] = sliced_logits
            cases[f"linear_token_logprobs {tag} H={s.H}"] = linear
            cases[f"grpo_loss_from_logits logits[:, :-1] {tag}"] = grpo

    def advantages():
        rewards = _meta(128 * 16, grad=True)
        for scale in ("group", "batch"):
            ops.group_advantages(rewards, 16, scale=scale, backend="triton").sum().backward()

    cases["group_advantages 128x16 fp32"] = advantages
    return cases


def _fsq_cases(ops, bench_fsq):
    cases = {}
    levels, d = bench_fsq.LEVELS, len(bench_fsq.LEVELS)
    for key, n in bench_fsq.FULL_TOKENS.items():

        def fsq(n=n):
            z = _meta(n // 320, 320, d, grad=True)
            codes, indices = ops.fsq_quantize(z, levels, backend="triton")
            codes.sum().backward()
            ops.fsq_codes_to_indices(codes.detach(), levels, backend="triton")
            ops.fsq_indices_to_codes(indices, levels, backend="triton")
            weight, bias = _meta(bench_fsq.CHANNELS, d), _meta(bench_fsq.CHANNELS)
            ops.fsq_dequantize(indices, levels, weight, bias, backend="triton")

        cases[f"fsq {key} {n} tokens levels {'x'.join(map(str, levels))} fp32"] = fsq
    return cases


def _group_norm_cases(ops, bench_group_norm):
    """GroupNorm(32) + SiLU forward and backward at the bench's shapes, NCHW and channels_last, bf16; also at its
    CPU-scaled shapes (the one-tile path) and for decoding 2 frames at full resolution (few large groups: the split
    kernels)."""
    cases = {}
    hi_res = bench_group_norm.FULL_SHAPES["hi-res"]
    few_frames = {"hi-res": (2, *hi_res[1:])}
    for scale, shapes in (("", bench_group_norm.FULL_SHAPES), (" (CPU-scaled)", bench_group_norm.CPU_SHAPES),
                          (" (2 frames)", few_frames)):
        for key, shape in shapes.items():
            for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):

                def group_norm(shape=shape, fmt=fmt):
                    x = torch.empty(shape, dtype=torch.bfloat16, device="meta", memory_format=fmt, requires_grad=True)
                    w = _meta(shape[1], dtype=torch.bfloat16, grad=True)
                    b = _meta(shape[1], dtype=torch.bfloat16, grad=True)
                    ops.group_norm_silu(x, 32, w, b, backend="triton").sum().backward()

                cases[f"group_norm_silu {key} {'x'.join(map(str, shape))}{scale} {layout} bf16"] = group_norm
    return cases


def _reward_cases(ops, bench_reward):
    from rlvrw.models import LPIPS

    dims = bench_reward.FULL
    B, G, H, W = dims["prompts"], dims["group"], dims["height"], dims["width"]

    def reward(grad: bool):
        model = LPIPS(bench_reward.NET, random_weights=True).to("meta")
        pred, target = _meta(B * G, 3, H, W, grad=grad), _meta(B, 3, H, W)
        out = ops.l1_lpips_reward(pred, target, G, model, precision="bf16", backend="triton")
        if grad:
            out.sum().backward()

    return {
        f"l1_lpips_reward {B}x{G} {H}x{W} LPIPS-{bench_reward.NET} bf16": lambda: reward(False),
        f"l1_lpips_reward {B}x{G} {H}x{W} LPIPS-{bench_reward.NET} bf16, backward": lambda: reward(True),
    }


def _frame_reward_cases(ops, bench_reward):
    """frame_reward's pixel metrics at the bench's shapes (``test_frame_reward_pixels``: its metrics, the full
    prompts x group at H x W), forward as the bench times it and backward (the reward is differentiable in pred), on
    fp32 and bf16 frames (the kernels compute in fp32 for both: bf16 frames are widened first)."""
    dims = bench_reward.FULL
    B, G, H, W = dims["prompts"], dims["group"], dims["height"], dims["width"]
    cases = {}
    for metric in bench_reward.PIXEL_METRICS:
        for dname, dtype in _DTYPES.items():

            def reward(metric=metric, dtype=dtype):
                pred = _meta(B * G, 3, H, W, dtype=dtype, grad=True)
                ops.frame_reward(pred, _meta(B, 3, H, W, dtype=dtype), G, metric, backend="triton").sum().backward()

            cases[f"frame_reward {metric} {B}x{G} {H}x{W} {dname}, backward"] = reward
    return cases


def cases() -> dict:
    """{case label: a callable that runs the ops of that case on meta tensors}."""
    import rlvrw.ops as ops

    conftest = _bench_module("conftest")
    return {
        **_logits_cases(ops, conftest),
        **_fsq_cases(ops, _bench_module("test_bench_fsq")),
        **_group_norm_cases(ops, _bench_module("test_bench_group_norm")),
        **_reward_cases(ops, _bench_module("test_bench_reward")),
        **_frame_reward_cases(ops, _bench_module("test_bench_reward")),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Reading a compiled kernel
# ----------------------------------------------------------------------------------------------------------------------

# the streaming loads and stores of the logits: the source lines of these jit helpers must compile to 16-byte accesses
STREAMING = {"_logits_forward_kernel": ("_load_tile",), "_logits_backward_kernel": ("_load_tile", "_store_tile")}

_LOC = re.compile(r"^\s*\.loc\s.*//\s*(\S+?):(\d+):\d+")
_MEMOP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s")
_F64_OPS = "add|sub|mul|mad|fma|div|rcp|sqrt|rsqrt|min|max|neg|abs|setp|ex2|lg2|testp|copysign"
_F64_ARITH = re.compile(rf"^\s*(?:@!?%p\d+\s+)?({_F64_OPS})\.[\w.]*f64")
_F64_CVT = re.compile(r"^\s*(?:@!?%p\d+\s+)?cvt\.[\w.]*f64")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _access_width(modifiers: str) -> int:
    """Bytes moved per thread by one ld/st.global with these modifiers (".v4.b32" -> 16)."""
    vec, bits = 1, 0
    for mod in modifiers.split("."):
        if re.fullmatch(r"v\d+", mod):
            vec = int(mod[1:])
        elif m := re.fullmatch(r"[bsuf](\d+)", mod):
            bits = int(m.group(1))
    return vec * bits // 8


def ptx_accesses(ptx: str) -> list[tuple[str, int, str, int]]:
    """Every global load and store: (kind "ld"/"st", bytes, source file name, source line)."""
    out, where, in_asm, asm_where = [], ("?", 0), False, None
    for line in ptx.splitlines():
        if "// begin inline asm" in line:
            in_asm, asm_where = True, None
        elif "// end inline asm" in line:
            in_asm = False
        elif m := _LOC.match(line):
            # LLVM counts the lines of a multi-line inline asm block on from its first .loc: only that one is real
            if not in_asm or asm_where is None:
                where = (Path(m.group(1)).name, int(m.group(2)))
                asm_where = where if in_asm else None
        elif m := _MEMOP.match(line):
            out.append((m.group(1), _access_width(m.group(2)), *where))
    return out


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame, static shared and local memory of the cubin's kernel (``cuobjdump -res-usage``).
    Register spills live in the stack frame, so a zero stack and zero local memory mean no spills."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    m = _RES.search(res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{res}")
    regs, stack, shared, local = map(int, m.groups())
    return {"registers": regs, "stack": stack, "static_shared": shared, "local": local}


def _streaming_lines(fn) -> set[tuple[str, int]]:
    """(file name, line) of the source of the STREAMING helpers of jit function ``fn``."""
    module = sys.modules[fn.fn.__module__]
    lines = set()
    for helper in STREAMING.get(fn.fn.__name__, ()):
        if not hasattr(module, helper):
            continue  # reported by problems(): no streaming access found
        source, first = inspect.getsourcelines(getattr(module, helper).fn)
        name = Path(inspect.getsourcefile(getattr(module, helper).fn)).name
        lines |= {(name, first + i) for i in range(len(source))}
    return lines


def _by_line(accesses) -> dict[str, str]:
    """Access widths per source line, e.g. {"ld logprobs.py:92": "16Bx4"} (in the JSON report, for debugging)."""
    lines: dict[str, list[int]] = {}
    for kind, width, name, line in accesses:
        lines.setdefault(f"{kind} {name}:{line}", []).append(width)
    return {where: _summary(widths) for where, widths in lines.items()}


def _summary(widths: list[int]) -> str:
    return " ".join(f"{w}Bx{n}" for w, n in sorted(Counter(widths).items(), reverse=True)) or "-"


def analyse(fn, kernel) -> dict:
    """One compiled kernel: its configuration, resources, access widths, and what is wrong with it."""
    src, meta = kernel.src, kernel.metadata
    params = [p.name for p in fn.params]
    signature = {name: str(ty) for name, ty in src.signature.items()}
    constants = {params[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    config = {k: (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in constants.items() if k in constexprs}
    aligned = {params[path[0]] for path, attrs in src.attrs.items() if ["tt.divisibility", 16] in attrs}
    pointers = [k for k, ty in signature.items() if ty.startswith("*")]
    # integer arguments Triton specialized: equal to 1 (a constant now) or divisible by 16
    specialized = [f"{k}=1" if k in constants else f"{k}%16" for k in params
                   if k not in constexprs and k not in pointers and (k in constants or k in aligned)]
    ptx = kernel.asm["ptx"]
    accesses = ptx_accesses(ptx)
    streaming = _streaming_lines(fn)
    row = {
        "kernel": fn.fn.__name__,
        "module": fn.fn.__module__.rsplit(".", 1)[-1],
        "file": Path(inspect.getsourcefile(fn.fn)).name,
        "config": config,
        "dtype": signature[pointers[0]].lstrip("*") if pointers else "-",
        "misaligned": [k for k in pointers if k not in aligned],
        "specialized": specialized,
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "num_warps": meta.num_warps,
        "shared": meta.shared,
        **_resource_usage(kernel.asm["cubin"]),
        "loads": _summary([w for kind, w, *_ in accesses if kind == "ld"]),
        "stores": _summary([w for kind, w, *_ in accesses if kind == "st"]),
        "streaming": _summary([w for kind, w, f, line in accesses if (f, line) in streaming]),
        "by_line": _by_line(accesses),
        "f64_arith": sum(bool(_F64_ARITH.match(line)) for line in ptx.splitlines()),
        "f64_cvt": sum(bool(_F64_CVT.match(line)) for line in ptx.splitlines()),
    }
    row["problems"] = problems(fn, row, accesses, streaming)
    return row


def problems(fn, row: dict, accesses, streaming) -> list[str]:
    found = []
    if row["stack"] or row["local"]:
        found.append(f"local memory (register spills or a stack frame): {row['stack']} B stack, {row['local']} B local")
    pointer_types = {ty.lstrip("*") for ty in row["signature"].values() if ty.startswith("*")}
    if "fp64" not in pointer_types and row["f64_arith"]:
        found.append(f"{row['f64_arith']} fp64 arithmetic instructions in a kernel without fp64 tensors")
    for p in fn.params:
        annotation = str(p._param.annotation)
        if "float64" in annotation or "fp64" in annotation:
            compiled = row["signature"].get(p.name)
            if compiled != "fp64":
                found.append(f"parameter {p.name} is annotated {annotation!r} but compiled as {compiled}")
    if fn.fn.__name__ in STREAMING:
        narrow = sorted({w for _, w, f, line in accesses if (f, line) in streaming and w < 16})
        if not any((f, line) in streaming for _, _, f, line in accesses):
            found.append("no access found at the streaming helpers' source lines (renamed? inlined away?)")
        elif narrow:
            found.append(f"streaming logits accesses narrower than 16 bytes: {narrow} B")
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


def kernels() -> dict[str, object]:
    """Every Triton kernel of ``rlvrw.kernels`` (a jit function that reads its program id), by "module.name"."""
    import pkgutil

    import rlvrw.kernels
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(rlvrw.kernels.__path__):
        module = importlib.import_module(f"rlvrw.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.__module__ == module.__name__ and "tl.program_id(" in obj.src:
                found[f"{info.name}.{name}"] = obj
    return found


def compile_target(capability: int, only: str | None = None) -> list[dict]:
    """Every case compiled for sm_<capability>: one row per distinct kernel binary, listing the cases using it.
    Needs a process whose kernels were not defined under TRITON_INTERPRET=1 (``main`` makes sure)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the kernels must be compiled, not interpreted: run without TRITON_INTERPRET=1")
    from rlvrw import checks

    checks.set_value_checks(False)  # meta tensors have no values
    rows: dict[str, dict] = {}
    errors = []
    for label, run in cases().items():
        if only and only not in label:
            continue
        with compiling_for(capability) as launched:
            try:
                run()
            except Exception as err:  # a compile error: report it with the case, keep going
                errors.append({"target": f"sm_{capability}", "case": label,
                               "error": f"{type(err).__name__}: {str(err)[-2000:]}"})
        for fn, kernel in launched:
            key = kernel.hash
            if key not in rows:
                rows[key] = {"target": f"sm_{capability}", **analyse(fn, kernel), "cases": []}
            if label not in rows[key]["cases"]:
                rows[key]["cases"].append(label)
    if not only:
        compiled = {(r["module"], r["kernel"]) for r in rows.values()}
        for name in kernels():
            if tuple(name.split(".")) not in compiled:
                errors.append({"target": f"sm_{capability}", "case": "coverage",
                               "error": f"kernel {name} is compiled by no case: add one to bench/static_compile.py"})
    return list(rows.values()) + errors


def _compile_target_quietly(args) -> tuple[list[dict], float]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # ptxas failures print the whole PTX
        rows = compile_target(*args)
    return rows, time.perf_counter() - start


def report(targets=TARGETS, jobs: int = 2, only: str | None = None) -> dict:
    """Compile for every target (one worker process per target, up to ``jobs`` at a time)."""
    work = [(t, only) for t in targets]
    if jobs > 1 and len(work) > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(work))) as pool:
            results = pool.map(_compile_target_quietly, work)
    else:
        results = [_compile_target_quietly(w) for w in work]
    import triton

    rows = [row for result, _ in results for row in result]
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "seconds": {f"sm_{t}": round(sec, 1) for t, (_, sec) in zip(targets, results)},
        "rows": rows,
        "problems": [
            f"{r['target']} {r['case']}: {r['error']}" if "error" in r
            else f"{r['target']} {r['kernel']} {r['config']}: {p}"
            for r in rows for p in (r.get("problems") or [None]) if p or "error" in r
        ],
    }


def _config_text(row: dict) -> str:
    text = " ".join(f"{k}={v}" for k, v in row["config"].items())
    if row["specialized"]:
        text += "; " + " ".join(row["specialized"])
    if row["misaligned"]:
        text += " (no 16-byte alignment assumed: " + ", ".join(row["misaligned"]) + ")"
    return text


def markdown(rep: dict) -> str:
    lines = [
        "# Triton kernels compiled ahead of time for sm_90 and sm_80",
        "",
        f"Written by `python bench/static_compile.py --write` (triton {rep['triton']}, torch {rep['torch']}); no GPU "
        "involved: the ops run on meta tensors at the benchmark shapes of `bench/` and every launch becomes a compile "
        "for the target (see the module's docstring). One row per kernel binary; the cases that compile it are listed "
        "under each table. `registers`, `stack` and `local` are `cuobjdump -res-usage` of the cubin (register spills "
        "would show as stack); `shared` is Triton's shared memory per program in "
        "bytes; `loads` and `stores` are the global accesses in the PTX as bytes per access x count, `logits` those "
        "of the logits passes' streaming loops (16 B required); `f64` counts fp64 arithmetic / fp64 conversions (of "
        "scalar arguments) in the PTX. After `;` the config lists the integer arguments Triton specialized (`=1`, "
        "`%16`: divisible by 16), and in parentheses the pointers it assumes no 16-byte alignment for (not aligned, "
        "or not specialized on alignment). " + TIMES +
        f"{', '.join(f'{k} {v} s' for k, v in rep['seconds'].items())}.",
        "",
        f"Problems: {len(rep['problems'])}." + "".join(f"\n- {p}" for p in rep["problems"]),
        "",
    ]
    for target in sorted({r["target"] for r in rep["rows"]}, reverse=True):
        rows = [r for r in rep["rows"] if r["target"] == target and "kernel" in r]
        rows.sort(key=lambda r: (r["file"], r["kernel"], r["dtype"], json.dumps(r["config"]), r["specialized"],
                                 r["misaligned"]))
        lines += [
            f"## {target}",
            "",
            "| # | kernel | dtype | config | warps | registers | stack / local | shared | loads | stores "
            "| logits | f64 |",
            "|---:|---|---|---|---:|---:|---|---:|---|---|---|---|",
        ]
        for i, r in enumerate(rows, 1):
            lines.append(
                f"| {i} | {r['file']}:{r['kernel']} | {r['dtype']} | {_config_text(r)} | {r['num_warps']} | "
                f"{r['registers']} | {r['stack']} / {r['local']} | {r['shared']} | "
                f"{r['loads']} | {r['stores']} | {r['streaming']} | {r['f64_arith']} / {r['f64_cvt']} |"
            )
        lines += ["", f"Cases ({target}):", ""]
        lines += [f"{i}. {'; '.join(r['cases'])}" for i, r in enumerate(rows, 1)]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {TABLE.relative_to(ROOT)}")
    parser.add_argument("--json", type=Path, help="write the full report as JSON to this file")
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one per target)")
    parser.add_argument("--only", help="only the cases whose label contains this text")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports the kernels (the workers inherit it)
    rep = report(tuple(args.arch), args.jobs, args.only)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    if args.write:
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(markdown(rep))
    n_kernels = sum("kernel" in r for r in rep["rows"])
    print(f"{n_kernels} kernel binaries for {', '.join(rep['seconds'])} in "
          f"{', '.join(f'{v} s' for v in rep['seconds'].values())}; {len(rep['problems'])} problems")
    for p in rep["problems"]:
        print("  " + p)
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
