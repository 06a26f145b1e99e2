"""The CUDA sources in csrc/ and their build.

CPU machines (CI) prove that the CUDA code compiles and that its row code is right:
  * every csrc/*.cu compiles with plain ``nvcc -arch=sm_90`` (no torch), and the CMake check target builds;
  * csrc/testing/host_emulation.cu runs the kernels' host+device row functions on the CPU against float64 math;
  * the torch glue csrc/ops.cpp passes a syntax check against the installed torch headers;
  * setup.py says why it skips the extension, and ``rlvrw._C_loader`` never raises.
GPU machines with the extension built (``pip install --no-build-isolation -e .`` on a CUDA torch) also run the
``gpu`` tests: ``torch.ops.rlvrw.logits_forward`` / ``logits_backward_`` against float64 torch math.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
# What torch's extension builds pass to nvcc: the kernels must compile under these too.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
SKIP_LINE = "rlvrw: skipping CUDA extension rlvrw._C: "


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None
    )


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _run_all(commands: list[list[str]], cwd: Path, timeout: float = 300) -> None:
    """Run the commands concurrently; fail with the output of every one that fails."""
    procs = [
        (cmd, subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for cmd in commands
    ]
    failures = []
    for cmd, proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failures.append(f"$ {' '.join(cmd)}\n(timed out)\n{out}")
            continue
        if proc.returncode != 0:
            failures.append(f"$ {' '.join(cmd)}\n(exit {proc.returncode})\n{out}")
    assert not failures, "\n\n".join(failures)


# ------------------------------------------------------------------------------------------------ CPU: compile


def test_csrc_layout():
    assert CU_SOURCES, "no csrc/*.cu"
    assert (CSRC / "rlvrw_kernels.h").is_file() and (CSRC / "ops.cpp").is_file()
    for src in CU_SOURCES + [CSRC / "rlvrw_kernels.h", CSRC / "logits_common.cuh"]:
        text = src.read_text()
        for banned in ("torch/", "ATen/", "c10/", "--use_fast_math", "__expf", "__logf"):
            assert banned not in text, f"{src.name} must stay torch-free and exact, found {banned!r}"


@pytest.fixture(scope="module")
def cu_objects(tmp_path_factory):
    """Every csrc/*.cu compiled with nvcc alone (sm_90 SASS, torch's defines, -fPIC), compiled in parallel."""
    if NVCC is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out = tmp_path_factory.mktemp("cu_objects")
    commands = [
        [NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-lineinfo", *TORCH_NVCC_DEFINES, "-Xcompiler", "-fPIC",
         f"-I{CSRC}", "-c", str(src), "-o", str(out / (src.stem + ".o"))]
        for src in CU_SOURCES
    ]
    _run_all(commands, cwd=ROOT)
    return [out / (src.stem + ".o") for src in CU_SOURCES]


def test_nvcc_compiles_every_cu(cu_objects):
    """This is how CI proves the CUDA code compiles: every csrc/*.cu with `nvcc -arch=sm_90 -c`, no torch."""
    assert len(cu_objects) == len(CU_SOURCES)
    for obj in cu_objects:
        assert obj.stat().st_size > 0


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_compile_check_target(tmp_path):
    build = tmp_path / "cmake"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={NVCC}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    _run_all([configure], cwd=ROOT)
    _run_all([["cmake", "--build", str(build), "--target", "rlvrw_cuda_compile_check", "-j", "2"]], cwd=ROOT)
    objects = list(build.rglob("*.cu.o"))
    assert {o.name.split(".")[0] for o in objects} >= {s.stem for s in CU_SOURCES}, objects


@needs_nvcc
def test_host_emulation_of_kernel_rows(tmp_path):
    """The kernels' row code (online softmax, entropy, -inf handling, alignment split, in-place backward; FSQ levels,
    indices and straight-through gradients over every code of every level set) run on the CPU against float64."""
    exe = tmp_path / "host_emulation"
    _run_all([[NVCC, "-std=c++17", "-O1", "-o", str(exe), str(CSRC / "testing" / "host_emulation.cu")]], cwd=ROOT)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failures" in res.stdout


def _cuda_include() -> str | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        candidates.append(str(Path(os.path.realpath(NVCC)).parents[1]))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return str(Path(home) / "include")
    return None


_GLUE_PROBE = r"""
import importlib.util, os, sys
sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)  # CUDA-only functions stay unresolved until called
import torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(torch.ops.rlvrw.logits_forward.default._schema)
print(torch.ops.rlvrw.logits_backward_.default._schema)
for name in ("fsq_quantize", "fsq_quantize_backward", "fsq_codes_to_indices", "fsq_indices_to_codes", "fsq_gather"):
    print(getattr(torch.ops.rlvrw, name).default._schema)
try:
    torch.ops.rlvrw.logits_forward(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0, False)
except NotImplementedError as exc:
    print("CPU call refused:", "CUDA" in str(exc))
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_glue_compiles_links_and_registers(cu_objects, tmp_path):
    """csrc/ops.cpp compiled against the installed torch headers, linked with the .cu objects into a module, loaded
    in a subprocess (so this process's torch.ops stay clean): the schemas parse and the C++ signatures match them.

    With a CPU torch two pieces of torch's CUDA build are missing: the generated header
    c10/cuda/impl/cuda_cmake_macros.h (an empty stand-in goes on the include path) and libc10_cuda (the one data
    symbol the glue references, CUDACachingAllocator::allocator, is defined by a stub; CUDA functions are left
    unresolved and the module is loaded with RTLD_LAZY since nothing here calls them)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found")
    cudart_dir = Path(cuda_inc).parent / "lib64"
    torch_lib = Path(library_paths()[0])
    cuda_torch = (torch_lib / "libc10_cuda.so").is_file()

    stub = tmp_path / "stub"
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / macros).is_file() for p in include_paths()):
        (stub / macros).parent.mkdir(parents=True)
        (stub / macros).write_text("#pragma once\n")
    includes = []
    for inc in [*include_paths(), sysconfig.get_paths()["include"], str(stub), cuda_inc]:
        includes += ["-isystem", inc]
    cxx = ["g++", "-std=c++20", "-O0", "-fPIC", "-Wall", "-Wextra", f"-I{CSRC}", *includes]
    objects = [*cu_objects, tmp_path / "ops.o"]
    commands = [cxx + ["-c", str(CSRC / "ops.cpp"), "-o", str(tmp_path / "ops.o")]]
    if not cuda_torch:
        (tmp_path / "stub.cpp").write_text(
            "#include <c10/cuda/CUDACachingAllocator.h>\n"
            "namespace c10::cuda::CUDACachingAllocator { std::atomic<CUDAAllocator*> allocator; }\n"
        )
        commands.append(cxx + ["-c", str(tmp_path / "stub.cpp"), "-o", str(tmp_path / "stub.o")])
        objects.append(tmp_path / "stub.o")
    _run_all(commands, cwd=ROOT)

    module = tmp_path / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    libs = ["-lc10", "-ltorch", "-ltorch_cpu"] + (["-lc10_cuda", "-ltorch_cuda"] if cuda_torch else [])
    link = ["g++", "-shared", "-o", str(module), *map(str, objects), f"-L{torch_lib}", *libs,
            f"-L{cudart_dir}", "-lcudart", f"-Wl,-rpath,{cudart_dir}", f"-Wl,-rpath,{torch_lib}"]
    _run_all([link], cwd=ROOT)

    res = subprocess.run([sys.executable, "-c", _GLUE_PROBE, str(module)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == ("rlvrw::logits_forward(Tensor logits, Tensor tokens, float inv_temperature, "
                        "bool with_entropy) -> (Tensor logp, Tensor lse, Tensor entropy)")
    assert lines[1] == ("rlvrw::logits_backward_(Tensor logits, Tensor tokens, float inv_temperature, Tensor lse, "
                        "Tensor grad_logp, Tensor? entropy, Tensor? grad_entropy, Tensor(a!) grad_logits) -> ()")
    assert lines[2:7] == [
        "rlvrw::fsq_quantize(Tensor z, Tensor consts, Tensor ints) -> (Tensor codes, Tensor indices)",
        "rlvrw::fsq_quantize_backward(Tensor z, Tensor grad_codes, Tensor consts) -> Tensor",
        "rlvrw::fsq_codes_to_indices(Tensor codes, Tensor consts, Tensor ints) -> Tensor",
        "rlvrw::fsq_indices_to_codes(Tensor indices, Tensor consts, Tensor ints, int codebook_size, "
        "ScalarType dtype) -> Tensor",
        "rlvrw::fsq_gather(Tensor indices, Tensor table) -> Tensor",
    ]
    assert lines[7] == "CPU call refused: True"


# ------------------------------------------------------------------------------------------ CPU: setup, loader


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("rlvrw_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() only runs under __main__
    return module


def test_setup_decision_reasons():
    setup_py = _load_setup_module()
    build, reason = setup_py.cuda_extension_decision({"RLVRW_NO_CUDA_EXT": "1"})
    assert (build, reason) == (False, "RLVRW_NO_CUDA_EXT is set")
    build, reason = setup_py.cuda_extension_decision({})
    if not torch.version.cuda:
        assert not build and reason == f"torch {torch.__version__} has no CUDA"
    else:
        assert build == (setup_py.find_nvcc() is not None), reason


def test_setup_prints_one_skip_line():
    env = dict(os.environ, RLVRW_NO_CUDA_EXT="1")
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("rlvrw:")]
    assert lines == [SKIP_LINE + "RLVRW_NO_CUDA_EXT is set"], res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == _load_setup_module().read_version()


def test_loader_never_raises():
    from rlvrw import _C_loader

    ok = _C_loader.load()
    assert isinstance(ok, bool)
    assert _C_loader.load() is ok  # cached
    info = _C_loader.version_info()
    assert info["loaded"] is ok and info["extension"] == "rlvrw._C"
    if ok:
        assert _C_loader.LOAD_ERROR is None and (info["built"] or info["backend"] == "cupy")
        assert hasattr(torch.ops.rlvrw, "logits_forward") and hasattr(torch.ops.rlvrw, "logits_backward_")
    else:
        assert isinstance(_C_loader.LOAD_ERROR, str) and _C_loader.LOAD_ERROR
        assert info["error"] == _C_loader.LOAD_ERROR


# --------------------------------------------------------------------------------------------------- GPU ops


def _extension_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from rlvrw import _C_loader

    return _C_loader.load()


needs_ext = pytest.mark.skipif(not _extension_ready(), reason="needs CUDA and the built rlvrw._C extension")
INV_T = 1.0 / 0.7
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _make_logits(n, v, dtype, pad=0, scale=3.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    full = torch.randn(n, v + pad, device="cuda", generator=gen) * scale
    full = full.to(dtype)
    return full[:, :v] if pad else full


def _make_tokens(n, v, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, v, (n,), device="cuda", generator=gen)
    tokens[1] = -100  # out of range: "no token"
    return tokens


def _reference(logits, tokens, inv_t, g, ge):
    """float64: logp, lse, entropy by torch math; the logits gradient of sum(g*logp + ge*entropy) by autograd."""
    z_in = logits.double().requires_grad_(True)
    z = z_in * inv_t
    logsm = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    valid = (tokens >= 0) & (tokens < logits.shape[1])
    picked = logsm.gather(-1, tokens.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    logp = torch.where(valid, picked, torch.full_like(picked, -math.inf))
    entropy = -(logsm.exp() * logsm).sum(-1)
    # A row without a valid token: its z_tok contributes nothing, logp = -lse for the gradient (the kernel's
    # formula with no one-hot term); callers zero grad_logp for rows they ignore.
    loss = (g.double() * torch.where(valid, picked, -lse)).sum()
    if ge is not None:
        loss = loss + (ge.double() * entropy).sum()
    (grad,) = torch.autograd.grad(loss, z_in)
    return logp.detach(), lse.detach(), entropy.detach(), grad


def _grad_atol(lse, entropy, g, ge, ref_grad):
    upstream = g.abs().max().item() + (0 if ge is None else ge.abs().max().item() * (1 + entropy.abs().max().item()))
    return 1e-6 * ref_grad.abs().max().item() + 1e-6 * (1 + lse.abs().max().item()) * INV_T * upstream


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("vocab,n_rows,pad", [(1000, 64, 0), (4633, 48, 3), (151936, 4, 0), (151933, 3, 5)])
@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("in_place", [True, False])
def test_ops_match_float64(dtype_name, vocab, n_rows, pad, with_entropy, in_place):
    dtype = DTYPES[dtype_name]
    logits = _make_logits(n_rows, vocab, dtype, pad=pad)
    tokens = _make_tokens(n_rows, vocab)
    gen = torch.Generator(device="cuda").manual_seed(2)
    g = torch.randn(n_rows, device="cuda", generator=gen)
    ge = torch.randn(n_rows, device="cuda", generator=gen) if with_entropy else None
    ref_logp, ref_lse, ref_ent, ref_grad = _reference(logits, tokens, INV_T, g, ge)

    logp, lse, ent = torch.ops.rlvrw.logits_forward(logits, tokens, INV_T, with_entropy)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == (n_rows,)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=2e-4)
    assert logp[1].item() == -math.inf
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=2e-4)
    if with_entropy:
        torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=2e-4)
    else:
        assert ent.numel() == 0
        ent = None

    if in_place:
        grad = logits.clone()
        grad_src = grad
    else:
        grad = torch.full((n_rows, vocab), float("nan"), device="cuda", dtype=dtype)  # poisoned: all must be written
        grad_src = logits
    torch.ops.rlvrw.logits_backward_(grad_src, tokens, INV_T, lse, g, ent, ge, grad)
    assert torch.isfinite(grad).all(), "some gradient entries were not written"
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_RTOL[dtype],
                               atol=_grad_atol(ref_lse, ref_ent, g, ge, ref_grad))
    if not in_place and pad == 0:  # same layout: in place and out of place are the same arithmetic
        again = logits.clone()
        torch.ops.rlvrw.logits_backward_(again, tokens, INV_T, lse, g, ent, ge, again)
        assert torch.equal(again, grad)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("vocab", [37, 4633, 40000])
def test_ops_masked_rows(dtype_name, vocab):
    """-inf logits (masked vocabulary) and a fully masked row: no NaN; lse = logp = -inf, entropy 0 for that row."""
    dtype = DTYPES[dtype_name]
    n = 6
    logits = _make_logits(n, vocab, dtype, seed=3)
    logits[0] = -math.inf
    logits[2, ::3] = -math.inf
    tokens = _make_tokens(n, vocab, seed=4)
    tokens[2] = 0  # a masked target
    g = torch.randn(n, device="cuda")
    ge = torch.randn(n, device="cuda")
    logp, lse, ent = torch.ops.rlvrw.logits_forward(logits, tokens, INV_T, True)
    assert lse[0].item() == -math.inf and logp[0].item() == -math.inf and ent[0].item() == 0.0
    assert logp[2].item() == -math.inf
    assert not torch.isnan(torch.stack([logp, lse, ent])).any()

    z = logits.double() * INV_T
    ref_lse = torch.logsumexp(z, -1)
    p = torch.exp(z - ref_lse[:, None]).nan_to_num(0.0)
    d = torch.where(p > 0, z - ref_lse[:, None], torch.zeros_like(z))
    ref_ent = torch.where(ref_lse.isinf(), torch.zeros_like(ref_lse), -(p * d).sum(-1))
    finite = ~ref_lse.isinf()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=2e-4)

    grad = torch.full_like(logits, float("nan"))
    torch.ops.rlvrw.logits_backward_(logits, tokens, INV_T, lse, g, ent, ge, grad)
    assert torch.isfinite(grad).all()
    onehot = torch.zeros_like(z)
    valid = (tokens >= 0) & (tokens < vocab)
    onehot[valid.nonzero()[:, 0], tokens[valid]] = 1.0
    ref_grad = INV_T * (g.double()[:, None] * (onehot - p) - ge.double()[:, None] * p * (d + ref_ent[:, None]))
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_RTOL[dtype],
                               atol=_grad_atol(ref_lse[finite], ref_ent, g, ge, ref_grad))


@pytest.mark.gpu
@needs_ext
def test_ops_reject_bad_inputs():
    logits = torch.randn(4, 10, device="cuda")
    tokens = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.ops.rlvrw.logits_forward(logits.cpu(), tokens.cpu(), 1.0, False)
    with pytest.raises(RuntimeError, match="int64|Long"):
        torch.ops.rlvrw.logits_forward(logits, tokens.int(), 1.0, False)
    with pytest.raises(RuntimeError, match="last dim"):
        torch.ops.rlvrw.logits_forward(logits.t(), tokens[:1].expand(10).contiguous(), 1.0, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.rlvrw.logits_forward(logits.double(), tokens, 1.0, False)
    logp, lse, _ = torch.ops.rlvrw.logits_forward(logits, tokens, 1.0, False)
    with pytest.raises(RuntimeError, match="entropy"):
        torch.ops.rlvrw.logits_backward_(logits, tokens, 1.0, lse, logp, None, torch.ones_like(lse), logits.clone())
    with pytest.raises(RuntimeError, match="overlap"):
        buf = torch.randn(5, 10, device="cuda")
        torch.ops.rlvrw.logits_backward_(buf[:4], tokens, 1.0, lse, logp, None, None, buf[1:])
