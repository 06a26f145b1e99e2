"""Shared machinery of the rlvrw benchmarks (pytest-benchmark).

Everything here is a fixture or a hook, so the test modules work whatever pytest's import mode is, and nothing here
is loaded by ``pytest tests/``. See bench/README.md for how to run and what the numbers mean.

* ``bench_env`` (session): the device, the logits dtype, the shapes (full on a GPU, scaled down on CPU unless
  ``RLVRW_BENCH_FULL=1``), the number of rounds, shared problem data, and the device's measured copy bandwidth and
  matmul rate (measured once, on first use).
* ``bench`` (per test): a ``Runner`` that times one implementation's fwd+bwd with ``benchmark.pedantic``, measures
  its peak memory on a GPU, and fills ``benchmark.extra_info``.
* ``benchmark``: pytest-benchmark's, with ``pedantic`` honouring ``--benchmark-min-rounds``.
* Hooks: the ``rlvrw`` report (versions, device) goes into the JSON's ``machine_info``, the session's settings and
  the device rates under ``rlvrw_bench``, the benchmarks that were skipped, with their reasons, under
  ``rlvrw_skipped``; saved runs go to rlvrw's cache directory unless ``--benchmark-storage`` says otherwise.
"""

from __future__ import annotations

import gc
import inspect
import math
import os
import shlex
import time
from dataclasses import dataclass

import pytest
import torch

FULL_ENV = "RLVRW_BENCH_FULL"
ROUNDS_ENV = "RLVRW_BENCH_ROUNDS"
MIN_ROUNDS_OPTION = "--benchmark-min-rounds"
STORAGE_OPTION = "--benchmark-storage"

GPU_ONLY_IMPLS = ("rlvrw-triton", "rlvrw-cuda", "liger")
# the rlvrw op whose automatic backend choice a benchmark's timing reflects
RESOLVED_OPS = {"grpo_fused_linear": "linear_token_logprobs"}


@dataclass(frozen=True)
class Shape:
    """A benchmark problem: B sequences of T tokens, vocabulary V, hidden size H."""

    key: str
    B: int
    T: int
    V: int
    H: int
    scaled: bool = False

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def label(self) -> str:
        text = f"{self.key} {self.B}x{self.T} V={self.V} H={self.H}"
        return text + " (CPU-scaled)" if self.scaled else text


# The shapes of the issue: a language model (Qwen2.5-1.5B-like head) and the RLVR-World video world model
# (128 prompts x G=16 = 2048 sequences of 321 response tokens, vocab 4633, hidden 768).
FULL_SHAPES = {
    "lm": Shape("lm", 8, 1024, 151936, 1536),
    "video": Shape("video", 2048, 321, 4633, 768),
}
# The same problems shrunk to run in a few minutes on a 2-core CPU; V stays a non-power-of-two.
CPU_SHAPES = {
    "lm": Shape("lm", 2, 256, 32003, 256, scaled=True),
    "video": Shape("video", 64, 321, 4633, 128, scaled=True),
}
SHAPE_KEYS = tuple(FULL_SHAPES)

# The GRPO settings of RLVR-World's video runs: clip 0.2, dual clip 3.0, k3 KL with coefficient 1e-3, token-mean.
GRPO_OPTIONS = dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=1e-3, kl_type="k3", loss_agg="token-mean")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rlvrw_report() -> dict:
    """``rlvrw.ops.report()``, or what can be said when it cannot run (e.g. a half-built checkout)."""
    try:
        from rlvrw.ops import report

        return report()
    except Exception as err:  # the report is informative, never a reason to lose a run
        import platform
        import sys

        info = {
            "report_error": f"{type(err).__name__}: {err}",
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
        }
        try:
            import rlvrw

            info["rlvrw"] = rlvrw.__version__
        except Exception as err2:
            info["rlvrw"] = f"not importable: {err2}"
        return info


def cuda_extension_status() -> tuple[bool, str]:
    """(loaded, reason) for ``rlvrw._C``."""
    try:
        from rlvrw import _C_loader
    except Exception as err:
        return False, f"rlvrw._C_loader not importable: {err}"
    try:
        if _C_loader.load():
            return True, ""
        return False, f"rlvrw._C not loaded: {getattr(_C_loader, 'LOAD_ERROR', None)}"
    except Exception as err:
        return False, f"rlvrw._C failed to load: {err}"


class BenchEnv:
    """Session-wide settings and caches."""

    def __init__(self):
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if self.device is None:
            self.device = torch.device("cpu")
        self.is_cuda = self.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"
        # bf16 logits as a trainer has them on a GPU; fp32 on CPU, where bf16 matmuls are slow.
        self.dtype = torch.bfloat16 if self.is_cuda else torch.float32
        self.full = self.is_cuda or os.environ.get(FULL_ENV, "0") == "1"
        self.shapes = FULL_SHAPES if self.full else CPU_SHAPES
        default_rounds = 10 if self.is_cuda else 3
        self.rounds = int(os.environ.get(ROUNDS_ENV, default_rounds))
        self.grpo_options = dict(GRPO_OPTIONS)
        self._rates: dict | None = None
        self._problems: dict = {}
        self._masters: dict = {}

    def shape(self, key: str) -> Shape:
        return self.shapes[key]

    # ---- device rates -------------------------------------------------------------------------------------------
    @property
    def rates(self) -> dict:
        if self._rates is None:
            self._rates = measure_device_rates(self.device, self.dtype)
        return self._rates

    # ---- problem data ---------------------------------------------------------------------------------------------
    def fill_logits(self, logits: torch.Tensor, seed: int = 0) -> None:
        """Write the same pseudo-random logits (std 2) into ``logits`` every time, outside autograd.

        On a GPU they are regenerated (cheap there, and a pristine copy would cost as much memory as the logits);
        on CPU generation is slow, so a pristine copy is made once per shape and copied in.
        """
        with torch.no_grad():
            if self.is_cuda:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(seed)
                logits.normal_(0.0, 2.0, generator=gen)
                return
            key = (tuple(logits.shape), logits.dtype, seed)
            master = self._masters.get(key)
            if master is None:
                gen = torch.Generator()
                gen.manual_seed(seed)
                master = torch.empty(logits.shape, dtype=logits.dtype).normal_(0.0, 2.0, generator=gen)
                self._masters[key] = master
            logits.copy_(master)

    def grpo_problem(self, shape: Shape) -> dict:
        """The non-logits inputs of a GRPO step, shared by every implementation of a shape (cached).

        tokens (B, T) uniform; mask (B, T) with response lengths uniform in [T/2, T]; old/ref log-probs = the true
        log-probs of the logits that ``fill_logits(seed=0)`` writes, plus noise (std 0.05 / 0.1), so ratios sit near 1
        and some clip; advantages (B,) standard normal.
        """
        if shape in self._problems:
            return self._problems[shape]
        dev = self.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(1234)
        B, T, V = shape.B, shape.T, shape.V
        tokens = torch.randint(0, V, (B, T), generator=gen, device=dev)
        lengths = torch.randint(T // 2, T + 1, (B, 1), generator=gen, device=dev)
        mask = torch.arange(T, device=dev).unsqueeze(0) < lengths
        advantages = torch.randn(B, generator=gen, device=dev)
        logits = torch.empty(B, T, V, dtype=self.dtype, device=dev)
        self.fill_logits(logits, seed=0)
        true_logp = torch.empty(B, T, dtype=torch.float32, device=dev)
        rows = max(1, (1 << 26) // (T * V))  # ~256 MiB of fp32 at a time
        with torch.no_grad():
            for b in range(0, B, rows):
                chunk = logits[b : b + rows].float()
                true_logp[b : b + rows] = torch.log_softmax(chunk, -1).gather(-1, tokens[b : b + rows, :, None])[..., 0]
        del logits
        old_logp = true_logp + 0.05 * torch.randn(B, T, generator=gen, device=dev)
        ref_logp = true_logp + 0.1 * torch.randn(B, T, generator=gen, device=dev)
        problem = {
            "tokens": tokens,
            "mask": mask,
            "maskf": mask.float(),
            "advantages": advantages,
            "old_logp": old_logp.contiguous(),
            "ref_logp": ref_logp.contiguous(),
        }
        _free(dev)
        self._problems[shape] = problem
        return problem

    def hidden_and_weight(self, shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Leaf tensors hidden (B, T, H) and weight (V, H), requiring grad, scaled so that logits have std ~2."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        hidden = torch.randn(shape.B, shape.T, shape.H, generator=gen, device=self.device, dtype=self.dtype)
        weight = torch.randn(shape.V, shape.H, generator=gen, device=self.device, dtype=self.dtype)
        weight.mul_(2.0 / math.sqrt(shape.H))
        return hidden.requires_grad_(), weight.requires_grad_()


def measure_device_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """The device's copy bandwidth (bytes read + written per second by a large device-to-device copy) and matmul rate
    (a large square matmul in ``dtype``: bf16 on a GPU, fp32 on CPU). The best of several repetitions."""
    if device.type == "cuda":
        nbytes, copy_reps, n, mm_reps = 1 << 30, 20, 8192, 20
    else:
        nbytes, copy_reps, n, mm_reps = 1 << 28, 5, 2048, 3
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    def best_seconds(fn, reps):
        fn()  # warm-up
        _sync(device)
        best = float("inf")
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
        return best

    copy_s = best_seconds(lambda: dst.copy_(src), copy_reps)
    del src, dst
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    mm_s = best_seconds(lambda: torch.mm(a, b, out=out), mm_reps)
    del a, b, out
    _free(device)
    return {
        "copy_gbps": 2 * nbytes / copy_s / 1e9,
        "copy_bytes": nbytes,
        "matmul_tflops": 2 * n**3 / mm_s / 1e12,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_size": n,
    }


_ENV: BenchEnv | None = None
_SKIPPED: list[dict] = []


def _get_env() -> BenchEnv:
    global _ENV
    if _ENV is None:
        _ENV = BenchEnv()
    return _ENV


@pytest.fixture(scope="session")
def bench_env() -> BenchEnv:
    return _get_env()


class Runner:
    """Times one implementation of one op on one shape; see ``run``."""

    def __init__(self, env: BenchEnv, benchmark):
        self.env = env
        self.benchmark = benchmark

    # ---- implementation selection ----------------------------------------------------------------------------------
    def rlvrw_backend(self, impl: str) -> str | None:
        """The ``backend=`` argument for an ``rlvrw*`` impl (None = automatic); skips what cannot run here."""
        if impl in GPU_ONLY_IMPLS and not self.env.is_cuda:
            pytest.skip(f"{impl} needs a CUDA device (this run is on {self.env.device_name})")
        if impl == "rlvrw":
            return None
        if impl == "rlvrw-triton":
            return "triton"
        if impl == "rlvrw-cuda":
            loaded, reason = cuda_extension_status()
            if not loaded:
                pytest.skip(f"rlvrw-cuda: {reason}")
            return "cuda"
        raise ValueError(impl)

    def need_liger(self, module: str, name: str):
        """``from liger_kernel.<module> import <name>``, or skip with the reason."""
        if not self.env.is_cuda:
            pytest.skip(f"liger needs a CUDA device (this run is on {self.env.device_name})")
        try:
            mod = __import__(f"liger_kernel.{module}", fromlist=[name])
            return getattr(mod, name)
        except Exception as err:
            pytest.skip(f"liger: cannot import liger_kernel.{module}.{name}: {type(err).__name__}: {err}")

    # ---- the run -------------------------------------------------------------------------------------------------
    def run(
        self,
        *,
        op: str,
        impl: str,
        shape: Shape | str,
        make_state,
        step,
        refill=None,
        bytes_moved: int | None = None,
        flops: int | None = None,
        rounds: int | None = None,
        extra: dict | None = None,
    ):
        """Benchmark ``step(state)`` (one fwd+bwd) in group ``"<op>: <shape label>"``.

        ``make_state()`` allocates this implementation's inputs (counted in its peak memory). Before every round,
        outside the timing, the leaf tensors of the state get ``.grad = None`` and ``refill(state)`` (if given)
        restores inputs that a previous round overwrote (in-place backward). On a GPU the timed call ends with
        ``torch.cuda.synchronize()``; one untimed warm-up call and one untimed call that measures peak memory come
        first. ``bytes_moved`` (the op's memory floor) or ``flops`` turn the median time into achieved GB/s or
        TFLOP/s and a fraction of the device's measured copy bandwidth or matmul rate.
        """
        env, benchmark, device = self.env, self.benchmark, self.env.device
        label = shape.label if isinstance(shape, Shape) else shape
        benchmark.group = f"{op}: {label}"
        rates = env.rates if (bytes_moved or flops) else {}

        _free(device)
        base = torch.cuda.memory_allocated(device) if env.is_cuda else 0
        peak = input_bytes = None
        out_of_memory = state = None

        def reset():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    value.grad = None
            if refill is not None:
                refill(state)
            _sync(device)

        def timed():
            step(state)
            _sync(device)

        try:
            state = make_state()
            if env.is_cuda:
                reset()
                timed()  # warm-up: compilation, autotuning, the backend race
                reset()
                input_bytes = torch.cuda.memory_allocated(device) - base
                torch.cuda.reset_peak_memory_stats(device)
                timed()
                peak = torch.cuda.max_memory_allocated(device) - base
            benchmark.pedantic(timed, setup=reset, rounds=rounds or env.rounds, warmup_rounds=1)
        except torch.cuda.OutOfMemoryError as err:
            # keep only the message: the exception's traceback would keep this benchmark's tensors alive
            out_of_memory = str(err).splitlines()[0]
        state = None
        _free(device)
        if out_of_memory is not None:
            pytest.skip(f"{impl} on {label}: out of memory on {env.device_name}: {out_of_memory}")

        median = benchmark.stats.stats.median if benchmark.stats is not None else None
        info = {
            "impl": impl,
            "op": op,
            "device": env.device_name,
            "shape": label,
            "dtype": str(env.dtype).replace("torch.", ""),
            "peak_mem_bytes": peak,
            "input_bytes": input_bytes,
            "passes": "fwd+bwd",
        }
        if isinstance(shape, Shape):
            info.update(shape_key=shape.key, B=shape.B, T=shape.T, V=shape.V, H=shape.H, scaled=shape.scaled)
        if bytes_moved:
            gbps = bytes_moved / median / 1e9 if median else None
            info.update(
                bytes_moved=bytes_moved,
                achieved_gbps=gbps,
                copy_gbps=rates["copy_gbps"],
                fraction_of_copy_bw=gbps / rates["copy_gbps"] if gbps else None,
            )
        if flops:
            tflops = flops / median / 1e12 if median else None
            info.update(
                flops=flops,
                achieved_tflops=tflops,
                matmul_tflops=rates["matmul_tflops"],
                matmul_dtype=rates["matmul_dtype"],
                fraction_of_matmul=tflops / rates["matmul_tflops"] if tflops else None,
            )
        if impl == "rlvrw":
            info["auto_backend"] = self._auto_backend(op, shape)
        info.update(extra or {})
        benchmark.extra_info.update(info)

    def _auto_backend(self, op: str, shape) -> str | None:
        """The backend that impl ``rlvrw`` (automatic choice) ran: reference on CPU; on a GPU the winner of the
        triton/cuda race that ``rlvrw.ops`` recorded for this problem size, else triton."""
        if not self.env.is_cuda:
            return "reference"
        resolved_op = RESOLVED_OPS.get(op, op)
        if not isinstance(shape, Shape):
            return "triton"
        try:
            from rlvrw.ops import _backend

            key = (resolved_op, self.env.device.index, self.env.dtype)
            key += (_backend.size_class(shape.N), _backend.size_class(shape.V))
            return _backend._FASTER.get(key, "triton")
        except Exception:
            return None


@pytest.fixture
def bench(bench_env, benchmark) -> Runner:
    return Runner(bench_env, benchmark)


def option_given(config, option: str) -> bool:
    """Whether the user set ``option`` (on the command line, in PYTEST_ADDOPTS or in the ini's addopts) rather than
    leaving its default."""
    args = list(config.invocation_params.args) + shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    args += list(config.getini("addopts"))
    return any(arg == option or arg.startswith(option + "=") for arg in args)


def min_rounds(config) -> int | None:
    """``--benchmark-min-rounds`` when the user gave it, else None."""
    return config.getoption("benchmark_min_rounds") if option_given(config, MIN_ROUNDS_OPTION) else None


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # without the plugin, say so instead of erroring on a missing fixture

    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed (pip install pytest-benchmark)")

else:

    @pytest.fixture
    def benchmark(benchmark, request):
        """pytest-benchmark's fixture, whose ``pedantic`` (which every benchmark here uses: fixed rounds after
        explicit warm-ups) runs at least ``--benchmark-min-rounds`` rounds when that option is given; pytest-benchmark
        itself applies the option only to its calibrated mode."""
        floor = min_rounds(request.config)
        if floor is not None:
            pedantic = benchmark.pedantic
            signature = inspect.signature(pedantic)

            def at_least_min_rounds(*args, **kwargs):
                call = signature.bind(*args, **kwargs)
                call.apply_defaults()
                call.arguments["rounds"] = max(call.arguments["rounds"], floor)
                return pedantic(*call.args, **call.kwargs)

            benchmark.pedantic = at_least_min_rounds
        return benchmark


# ---- hooks ------------------------------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Before pytest-benchmark reads it: saved runs (``--benchmark-save``, ``--benchmark-autosave``) and the runs
    ``--benchmark-compare`` reads go to rlvrw's cache directory (``$RLVRW_CACHE/benchmarks``, default
    ``~/.cache/rlvrw/benchmarks``) rather than pytest-benchmark's default ``./.benchmarks``, inside the checkout;
    ``--benchmark-storage`` still chooses."""
    if getattr(config.option, "benchmark_storage", None) is None or option_given(config, STORAGE_OPTION):
        return
    from rlvrw.files import cache_dir

    config.option.benchmark_storage = cache_dir("benchmarks").as_uri()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    # machine_info says which machine ran: --benchmark-compare warns when a saved run's differs from this session's,
    # which pytest-benchmark computes before any benchmark has run. So nothing measured goes in (the device rates and
    # this session's settings are under the JSON's "rlvrw_bench"), and the CPU's momentary clock reading comes out.
    machine_info["rlvrw"] = rlvrw_report()
    cpu = machine_info.get("cpu")
    if isinstance(cpu, dict):
        for key in ("hz_actual", "hz_actual_friendly"):
            cpu.pop(key, None)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["rlvrw_skipped"] = list(_SKIPPED)
    if _ENV is not None:
        output_json["rlvrw_bench"] = {
            "device": _ENV.device_name,
            "dtype": str(_ENV.dtype).replace("torch.", ""),
            "full_shapes": _ENV.full,
            "rounds": _ENV.rounds,
            "min_rounds": min_rounds(config),
            "torch_threads": torch.get_num_threads(),
            "rates": _ENV._rates,
        }


def pytest_runtest_logreport(report):
    # a hook of a conftest below the root sees only the tests of its directory: these are all benchmarks
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})
