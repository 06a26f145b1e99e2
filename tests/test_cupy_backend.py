"""The cupy fallback of the ``cuda`` backend (rlvrw._C_cupy): csrc's kernels compiled with NVRTC at first use.

CPU (always): the sources NVRTC gets are device code only and complete (nvcc compiles them to exactly the kernels the
glue instantiates; the real NVRTC too where its library is found); the glue's op signatures equal csrc/ops.cpp's
schemas; with cupy faked, each op launches the kernel, template, grid, block and shared memory the C launcher would,
with every argument packed as the kernel declares it (strided (B, T, V) logits as a row layout, not copied); the
host helpers equal the C ones compiled with nvcc; a kernel that gains a parameter (a struct that renames a field)
fails with its name; the loader registers the ops as the ``cuda`` backend and says why when it cannot.
GPU (``gpu``): the GPU tests of the extension's ops run again against the NVRTC-compiled kernels (rlvrw._C hidden),
and the ``cuda`` backend of the public ops matches the reference, gradients included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rlvrw import _C_cupy as C
from rlvrw import _nvrtc_source as S

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


def expressions_by_unit() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for kernel, template in C.instantiations():
        unit = C.UNIT_OF[kernel]
        found.setdefault(unit, []).append(S.expression(S.kernels(unit)[kernel], *template))
    return found


def clear_source_caches():
    for fn in (S.translation_unit, S.kernels, S.structs, S.constants):
        fn.cache_clear()


# ---- the sources NVRTC gets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", S.UNITS)
def test_nvrtc_source_is_device_code_only_and_self_contained(unit):
    text = S.translation_unit(unit)
    code = S._code(text)
    assert set(re.findall(r"#\s*include\s*[<\"]([^>\"]+)", code)) <= set(S.PROVIDED_HEADERS)
    assert "<<<" not in code and 'extern "C"' not in code and "cudaGetLastError" not in code
    for _, item in S._walk(S.split_items(text), ()):
        if item.kind == "function":
            assert S._is_device(item), f"host code left in the NVRTC source: {item.text.strip()[:120]}"
    kernels = S.kernels(unit)
    assert {k for k, u in C.UNIT_OF.items() if u == unit} <= set(kernels)
    assert all(k.name.startswith("rlvrw::detail::") for k in kernels.values())


def test_what_is_left_out_is_the_host_launch_code():
    """The NVRTC source is the .cu file minus its launchers: the kernels' bodies are there character for character."""
    original = (ROOT / "csrc" / "logits_forward.cu").read_text()
    kernel = re.search(r"template <typename T, int THREADS, int BLOCK, bool kEntropy>\n__global__.*?\n}\n", original,
                       re.S).group(0)
    text = S.translation_unit("logits_forward.cu")
    assert kernel in text
    assert "dispatch_forward" in original and "dispatch_forward" not in text


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("unit", S.UNITS)
def test_nvcc_compiles_the_nvrtc_source_to_every_kernel_the_glue_launches(unit, tmp_path):
    names = expressions_by_unit()[unit]
    probe = "static const void* rlvrw_probe[] = {\n" + ",\n".join(f"    (const void*)&{n}" for n in names) + "};\n"
    src = tmp_path / f"{unit}.probe.cu"
    src.write_text(S.translation_unit(unit) + probe)
    run = subprocess.run([NVCC, "-std=c++17", "-arch=compute_90", "--ptx", str(src), "-o", str(tmp_path / "out.ptx"),
                          "-diag-suppress", "177"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    entries = re.findall(r"\.entry\s+(\w+)", (tmp_path / "out.ptx").read_text())
    assert len(entries) == len(names) == len(set(entries))


def find_nvrtc() -> str | None:
    """A loadable NVRTC: RLVRW_TEST_NVRTC, the system's, or the one an NVIDIA wheel installed."""
    named = os.environ.get("RLVRW_TEST_NVRTC") or ctypes.util.find_library("nvrtc")
    if named:
        return named
    nvidia = importlib.util.find_spec("nvidia")
    for root in (nvidia.submodule_search_locations or []) if nvidia else []:
        for path in sorted(Path(root).glob("*/lib/libnvrtc.so*")):
            if "builtins" not in path.name and ".alt." not in path.name:
                return str(path)
    return None


@pytest.mark.parametrize("unit", S.UNITS)
def test_nvrtc_compiles_every_kernel_the_glue_launches(unit):
    path = find_nvrtc()
    if path is None:
        pytest.skip("no NVRTC library here (set RLVRW_TEST_NVRTC to a libnvrtc.so)")
    if not C.include_dirs():
        pytest.skip("no folder with cuda_fp16.h and cuda_bf16.h (set CUDA_HOME)")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), S.translation_unit(unit).encode(), b"rlvrw.cu", 0, None,
                                  None) == 0
    names = expressions_by_unit()[unit]
    for name in names:
        assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
    options = [o.encode() for o in C.OPTIONS + tuple(f"-I{d}" for d in C.include_dirs()) + ("-arch=compute_90",)]
    result = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert result == 0, log.value.decode()
    lowered = set()
    for name in names:
        out = ctypes.c_char_p()
        assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0
        lowered.add(out.value)
    assert len(lowered) == len(names)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---- the glue against csrc -------------------------------------------------------------------------------------------
def test_op_signatures_equal_the_schemas_of_ops_cpp():
    C.check_bindings()
    schemas = C.schemas()
    assert set(schemas) == {"logits_forward", "logits_backward_", "fsq_quantize", "fsq_quantize_backward",
                            "fsq_codes_to_indices", "fsq_indices_to_codes", "fsq_gather"}
    assert C.schema_arguments(schemas["logits_backward_"]) == [
        "logits", "tokens", "inv_temperature", "lse", "grad_logp", "entropy", "grad_entropy", "grad_logits"]


def test_launch_geometry_restates_the_c_launchers():
    common = (ROOT / "csrc" / "logits_common.cuh").read_text()
    limits = re.findall(r"if \(vocab <= (\d+)\) return Shape::(\w+);", common)
    assert [int(v) for v, _ in limits] == [s[0] for s in C.SHAPES[:-1]]
    for unit in ("logits_forward.cu", "logits_backward.cu"):
        text = (ROOT / "csrc" / unit).read_text()
        pattern = r"case Shape::\w+:\s*return launch_\w+<T, (\d+), (\d+)"
        launched = [(int(a), int(b)) for a, b in re.findall(pattern, text)]
        default = [(int(a), int(b)) for a, b in re.findall(r"default:\s*return launch_\w+<T, (\d+), (\d+)", text)]
        assert launched + default == [(t, b) for _, t, b in C.SHAPES], unit
    fsq = (ROOT / "csrc" / "fsq.cu").read_text()
    units = re.findall(r"case (\d+):\s*return launch_gather<(\w+), I>", fsq) + \
        [("1", u) for u in re.findall(r"default:\s*return launch_gather<(\w+), I>", fsq)]
    assert [(int(n), u) for n, u in units] == list(C.GATHER_UNITS)
    assert len(re.findall(r"<<<elementwise_grid\([^;]*?, 256\), 256, 0, stream>>>", fsq)) == 3
    assert len(re.findall(r"<<<row_grid\(sh\.n_rows\), kFsqRowsPerBlock, smem, stream>>>", fsq)) == 2
    assert fsq.count("sizeof(float) * kFsqRowsPerBlock * sh.d") == 2
    assert C.constant("kMaxGridBlocks") == 1 << 21 and C.constant("kFsqRowsPerBlock") == 256
    assert (C.grid_for(0, 8), C.grid_for(17, 8), C.grid_for(10**9, 1)) == (1, 3, 1 << 21)
    assert (C.row_grid(1), C.row_grid(257)) == (1, 2)
    assert (C.elementwise_grid(1, 256), C.elementwise_grid(2049, 256)) == (1, 2)
    assert C.gather_unit(64, 128, 10) == (2, "uint16_t") and C.gather_unit(64, 128, 32) == (16, "uint4")


LAYOUT_PROBE = r"""
#include "logits_common.cuh"
#include <cstdio>
using namespace rlvrw::detail;
int main() {
  const long long cases[][5] = {CASES};
  for (const auto& c : cases) {
    const RowLayout l{c[2], c[3], c[4]};
    const bool ok = valid_layout(c[0], c[1], c[2], c[3], c[4]);
    std::printf("%d %lld %lld %u\n", ok ? 1 : 0, ok ? (long long)row_start(c[0] - 1, l) : -1LL,
                ok ? (long long)row_start(c[0] / 2, l) : -1LL, grid_for(c[0], 8));
  }
  return 0;
}
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_row_layout_helpers_restate_the_c_ones(tmp_path):
    """valid_layout, row_start and grid_for against the C functions of logits_common.cuh, compiled for the host."""
    cases = [(n, v, per_seq, seq, row) for n in (1, 2, 15, 2 * 10**7) for v in (0, 1, 1001)
             for per_seq in (0, 1, 5, n) for seq in (-1, 0, 6006) for row in (-3, 0, 1000, 1001)]
    src = tmp_path / "probe.cu"
    src.write_text(LAYOUT_PROBE.replace("CASES", ", ".join("{%d, %d, %d, %d, %d}" % c for c in cases)))
    exe = tmp_path / "probe"
    build = subprocess.run([NVCC, "-std=c++17", f"-I{ROOT / 'csrc'}", "-o", str(exe), str(src)], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert len(lines) == len(cases)
    for (n, v, per_seq, seq, row), line in zip(cases, lines):
        ok = C.valid_layout(n, v, per_seq, seq, row)
        layout = dict(rows_per_seq=per_seq, seq_stride=seq, row_stride=row)
        starts = (C.row_start(n - 1, layout), C.row_start(n // 2, layout)) if ok else (-1, -1)
        assert line.split() == [str(int(ok)), *map(str, starts), str(C.grid_for(n, 8))], (n, v, per_seq, seq, row)
    assert sum(C.valid_layout(*c) for c in cases) not in (0, len(cases))


class FakeCupy(types.ModuleType):
    """cupy's surface that rlvrw._C_cupy uses: RawModule compiles nothing, launchKernel decodes its arguments."""

    def __init__(self):
        super().__init__("cupy")
        self.compiled, self.launches, self.functions = [], [], {}
        fake = self

        class RawModule:
            def __init__(self, code, options, name_expressions):
                fake.compiled.append((code, tuple(options), tuple(name_expressions)))

            def get_function(self, name):
                ptr = 4096 + len(fake.functions)
                fake.functions[ptr] = name
                return types.SimpleNamespace(ptr=ptr)

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        def launch_kernel(f, gx, gy, gz, bx, by, bz, shared_mem, stream, params, extra):
            name = fake.functions[f]
            kernel = name.split("<")[0].rsplit("::", 1)[1]
            unit = C.UNIT_OF[kernel]
            args = {}
            for i, p in enumerate(S.kernels(unit)[kernel].params):
                address = ctypes.c_void_p.from_address(params + i * ctypes.sizeof(ctypes.c_void_p)).value
                if p.is_pointer:
                    args[p.name] = ctypes.c_void_p.from_address(address).value or 0
                elif p.type in C.C_TYPES:
                    args[p.name] = C.C_TYPES[p.type].from_address(address).value
                else:
                    value = C.struct_type(unit, p.type).from_address(address)
                    args[p.name] = tuple(getattr(value, f) for _, f in S.structs(unit)[p.type])
            fake.launches.append(dict(expression=name, grid=(gx, gy, gz), block=(bx, by, bz), shared_mem=shared_mem,
                                      stream=stream, extra=extra, args=args))

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(Device=Device, driver=types.SimpleNamespace(launchKernel=launch_kernel))


@pytest.fixture
def fake(monkeypatch):
    cupy = FakeCupy()
    monkeypatch.setattr(C, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(C, "launch_context", lambda tensor: (0, 777))
    monkeypatch.setattr(C, "_launch", C.Launcher(cupy, ["/opt/cuda/include"]))
    return cupy


def test_logits_ops_launch_what_the_c_launcher_would(fake):
    full = torch.randn(5, 1003)
    logits = full[:, :1000]  # a row stride that is not the vocabulary
    tokens = torch.tensor([3, -100, 999, 0, 7])
    logp, lse, entropy = C.logits_forward(logits, tokens, 1 / 0.7, True)
    (launch,) = fake.launches
    assert launch["expression"] == "rlvrw::detail::logits_forward_kernel<float, 32, 256, true>"
    assert launch["grid"] == (1, 1, 1) and launch["block"] == (256, 1, 1) and launch["shared_mem"] == 0
    assert launch["stream"] == 777 and launch["extra"] == 0
    assert launch["args"] == dict(logits=logits.data_ptr(), n_rows=5, vocab=1000, layout=(5, 0, 1003),
                                  tokens=tokens.data_ptr(), inv_t=pytest.approx(1 / 0.7), logp=logp.data_ptr(),
                                  lse=lse.data_ptr(), entropy=entropy.data_ptr())
    assert logp.shape == lse.shape == entropy.shape == (5,) and logp.dtype == torch.float32
    code, options, names = fake.compiled[0]
    assert code == S.translation_unit("logits_forward.cu") and names == (launch["expression"],)
    assert options == C.OPTIONS + ("-I/opt/cuda/include",)

    big = torch.randn(3, 40000, dtype=torch.bfloat16)
    _, _, none = C.logits_forward(big, torch.zeros(3, dtype=torch.long), 1.0, False)
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::logits_forward_kernel<__nv_bfloat16, 512, 512, false>"
    assert launch["grid"] == (3, 1, 1) and launch["block"] == (512, 1, 1)
    assert launch["args"]["entropy"] == 0 and none.numel() == 0
    C.logits_forward(big[:0], torch.zeros(0, dtype=torch.long), 1.0, True)
    assert len(fake.launches) == 2  # no rows: nothing to launch

    half = torch.randn(4, 9000, dtype=torch.float16)
    tokens = torch.tensor([1, 2, 3, 4])
    lse, g, ent, ge = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    C.logits_backward_(half, tokens, 2.0, lse, g, ent, ge, half)  # in place, with the entropy term
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::logits_backward_kernel<__half, 256, 256, true>"
    assert launch["args"] == dict(logits=half.data_ptr(), layout=(4, 0, 9000), grad=half.data_ptr(),
                                  grad_layout=(4, 0, 9000), n_rows=4, vocab=9000, tokens=tokens.data_ptr(), inv_t=2.0,
                                  lse=lse.data_ptr(), grad_logp=g.data_ptr(), entropy=ent.data_ptr(),
                                  grad_entropy=ge.data_ptr())
    out = torch.empty(4, 9000, dtype=torch.float16)
    C.logits_backward_(half, tokens, 2.0, lse, g, None, None, out)
    launch = fake.launches[-1]
    assert launch["expression"].endswith("<__half, 256, 256, false>")
    assert launch["args"]["grad"] == out.data_ptr() and launch["args"]["grad_entropy"] == 0


def test_strided_3d_logits_are_read_in_place_as_the_c_glue_passes_them(fake):
    """logits[:, :-1] of a (B, T + 1, V) tensor: no copy, rows of a (B, T) grid (rows_of in ops.cpp), and the layout
    puts every row where the tensor has it; the backward writes into a buffer with its own layout or in place."""
    full = torch.randn(3, 6, 1001, dtype=torch.bfloat16)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    tokens = torch.arange(15) * 60
    logp, lse, entropy = C.logits_forward(logits, tokens, 1.0, True)
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::logits_forward_kernel<__nv_bfloat16, 32, 256, true>"
    assert launch["grid"] == (2, 1, 1)  # 15 rows, 8 per block
    assert launch["args"]["logits"] == full.data_ptr() and launch["args"]["n_rows"] == 15
    assert launch["args"]["layout"] == (5, 6 * 1001, 1001) and launch["args"]["vocab"] == 1001
    layout = dict(zip(("rows_per_seq", "seq_stride", "row_stride"), launch["args"]["layout"]))
    for row in range(15):
        where = launch["args"]["logits"] + C.row_start(row, layout) * full.element_size()
        assert where == logits[row // 5, row % 5].data_ptr(), row
    assert logp.shape == lse.shape == entropy.shape == (15,)

    from rlvrw.kernels.logprobs import empty_rows_like

    out = empty_rows_like(logits)
    C.logits_backward_(logits, tokens, 1.0, lse, torch.ones(15), entropy, torch.ones(15), out)
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::logits_backward_kernel<__nv_bfloat16, 32, 256, true>"
    assert launch["args"]["layout"] == (5, 6006, 1001) and launch["args"]["grad"] == out.data_ptr()
    assert launch["args"]["grad_layout"] == (5, out.stride(0), out.stride(1))
    grad_layout = dict(zip(("rows_per_seq", "seq_stride", "row_stride"), launch["args"]["grad_layout"]))
    assert all(out.data_ptr() + C.row_start(r, grad_layout) * 2 == out[r // 5, r % 5].data_ptr() for r in range(15))
    C.logits_backward_(logits, tokens, 1.0, lse, torch.ones(15), None, None, logits)  # in place
    assert fake.launches[-1]["args"]["grad_layout"] == fake.launches[-1]["args"]["layout"] == (5, 6006, 1001)

    one = full[:, :1]  # T = 1: one row per sequence, its row stride never used
    C.logits_forward(one, tokens[:3], 1.0, False)
    assert fake.launches[-1]["args"]["layout"] == (1, 6006, 1001) and fake.launches[-1]["args"]["n_rows"] == 3
    count = len(fake.launches)
    logp, _, _ = C.logits_forward(full[:, :0], tokens[:0], 1.0, False)  # T = 0: no rows, no launch
    assert logp.shape == (0,) and len(fake.launches) == count


def test_logits_ops_check_their_inputs_as_ops_cpp(fake):
    logits, tokens = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="int64"):
        C.logits_forward(logits, tokens.int(), 1.0, False)
    with pytest.raises(RuntimeError, match="last dim"):
        C.logits_forward(torch.randn(10, 4).t(), tokens, 1.0, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        C.logits_forward(logits.double(), tokens, 1.0, False)
    logp, lse, _ = C.logits_forward(logits, tokens, 1.0, False)
    with pytest.raises(RuntimeError, match="entropy"):
        C.logits_backward_(logits, tokens, 1.0, lse, logp, None, torch.ones_like(lse), logits.clone())
    buf = torch.randn(5, 10)
    with pytest.raises(RuntimeError, match="overlap"):
        C.logits_backward_(buf[:4], tokens, 1.0, lse, logp, None, None, buf[1:])
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        C.logits_forward(logits.to("meta"), tokens.to("meta"), 1.0, False)
    with pytest.raises(RuntimeError, match=r"\(N, V\) or \(B, T, V\)"):
        C.logits_forward(torch.randn(2, 2, 2, 10), tokens.repeat(2), 1.0, False)
    with pytest.raises(RuntimeError, match=r"rows overlap \(stride 5 < V = 10\)"):
        C.logits_forward(torch.randn(60).as_strided((2, 3, 10), (30, 5, 1)), tokens[:3].repeat(2), 1.0, False)
    with pytest.raises(RuntimeError, match=r"tokens must have shape \(6,\)"):
        C.logits_forward(torch.randn(2, 4, 10)[:, :-1], tokens, 1.0, False)  # B * T rows
    with pytest.raises(RuntimeError, match="in-place grad_logits must have the logits' strides"):
        C.logits_backward_(buf[:4], tokens, 1.0, lse, logp, None, None, buf.as_strided((4, 10), (11, 1)))
    assert len(fake.launches) == 1  # only the valid forward above launched


def test_fsq_ops_launch_what_the_c_launchers_would(fake):
    levels = [7, 5, 5]
    consts, ints = torch.randn(4, 3), torch.tensor([levels, [1, 7, 35]], dtype=torch.int32)
    z = torch.randn(2, 3, 11).transpose(1, 2)  # (B, S, d) read in place from a channel-first tensor
    codes, indices = C.fsq_quantize(z, consts, ints)
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::fsq_quantize_kernel<float>"
    assert launch["grid"] == (1, 1, 1) and launch["block"] == (256, 1, 1) and launch["shared_mem"] == 4 * 256 * 3
    assert codes.stride() == z.stride() and indices.shape == (2, 11) and indices.dtype == torch.int32
    assert launch["args"] == dict(z=z.data_ptr(), zs=z.stride(), codes=codes.data_ptr(), cs=codes.stride(),
                                  indices=indices.data_ptr(), sh=(22, 11, 3), consts=consts.data_ptr(),
                                  ints=ints.data_ptr())

    grad = torch.randn(2, 11, 3, dtype=torch.bfloat16)
    grad_z = C.fsq_quantize_backward(z.bfloat16(), grad, consts)
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::fsq_quantize_backward_kernel<__nv_bfloat16>"
    assert launch["args"]["dz"] == grad_z.data_ptr() and launch["args"]["gs"] == grad.stride()
    assert launch["block"] == (256, 1, 1) and launch["shared_mem"] == 0

    C.fsq_codes_to_indices(codes.half(), consts, ints)
    assert fake.launches[-1]["expression"] == "rlvrw::detail::fsq_codes_to_indices_kernel<__half>"

    every = torch.arange(0, 350, dtype=torch.int64)[::2]  # int64 indices two elements apart
    out = C.fsq_indices_to_codes(every, consts, ints, 175, torch.float16)
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::fsq_indices_to_codes_kernel<__half, int64_t>"
    assert launch["args"] == dict(indices=every.data_ptr(), index_stride=2, n=175, d=3, codebook_size=175,
                                  codes=out.data_ptr(), consts=consts.data_ptr(), ints=ints.data_ptr())
    assert out.shape == (175, 3) and out.dtype == torch.float16

    table = torch.randn(176, 5, dtype=torch.float16)  # 10-byte rows: copied in 2-byte units
    rows = C.fsq_gather(every.int(), table)
    launch = fake.launches[-1]
    assert launch["expression"] == "rlvrw::detail::fsq_gather_kernel<uint16_t, int32_t>"
    assert launch["args"]["units_per_row"] == 5 and launch["args"]["codebook_size"] == 175
    assert launch["grid"] == (C.elementwise_grid(175 * 5, 256), 1, 1) and rows.shape == (175, 5)


def test_a_kernel_that_gains_a_parameter_fails_naming_it(fake, monkeypatch, tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    path = csrc / "logits_forward.cu"
    text = path.read_text()
    assert text.count("const int64_t* __restrict__ tokens, float inv_t,") == 1
    path.write_text(text.replace("const int64_t* __restrict__ tokens, float inv_t,",
                                 "const int64_t* __restrict__ tokens, int64_t tokens_stride, float inv_t,"))
    monkeypatch.setattr(S, "csrc_dir", lambda: csrc)
    clear_source_caches()
    try:
        assert [p.name for p in S.kernels("logits_forward.cu")["logits_forward_kernel"].params][5] == "tokens_stride"
        with pytest.raises(TypeError, match="tokens_stride"):
            C.logits_forward(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), 1.0, False)
    finally:
        monkeypatch.undo()
        clear_source_caches()


def test_a_struct_that_renames_a_field_fails_naming_it(fake, monkeypatch, tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    path = csrc / "logits_common.cuh"
    text = path.read_text()
    assert text.count("int64_t rows_per_seq, seq_stride, row_stride;") == 1
    path.write_text(text.replace("int64_t rows_per_seq, seq_stride, row_stride;",
                                 "int64_t rows_per_seq, seq_stride, row_pitch;"))
    monkeypatch.setattr(S, "csrc_dir", lambda: csrc)
    clear_source_caches()
    try:
        with pytest.raises(TypeError, match="RowLayout layout has fields .*row_pitch"):
            C.logits_forward(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), 1.0, False)
    finally:
        monkeypatch.undo()
        clear_source_caches()


def test_include_dirs_take_cuda_home_first(monkeypatch, tmp_path):
    for header in S.PROVIDED_HEADERS:
        (tmp_path / "include").mkdir(exist_ok=True)
        (tmp_path / "include" / header).write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert C.include_dirs() == [str(tmp_path / "include")]


# ---- registration as the cuda backend --------------------------------------------------------------------------------
REGISTER_WITH_FAKE_CUPY = r"""
import sys, types, torch
sys.modules["rlvrw._C"] = None  # as where the extension was not built
sys.modules["cupy"] = types.ModuleType("cupy")
from rlvrw import _C_cupy, _C_loader
from rlvrw.ops import _backend
_C_cupy._why_not = lambda: None  # as on a CUDA machine
_C_cupy.include_dirs = lambda: ["/opt/cuda/include"]
_C_cupy._smoke_test = lambda: None
assert _C_loader.load() and _C_loader.BACKEND == "cupy" and _C_loader.LOAD_ERROR is None, _C_loader.LOAD_ERROR
assert _C_loader.version_info()["backend"] == "cupy"
for name, schema in _C_cupy.schemas().items():
    registered = str(getattr(torch.ops.rlvrw, name).default._schema)
    assert registered.replace(" ", "") == ("rlvrw::" + schema).replace(" ", ""), (registered, schema)
assert _backend.resolve("token_logprobs", torch.device("cuda"), "cuda") == "cuda"
assert _backend.resolve("fsq_quantize", torch.device("cuda"), "cuda") == "cuda"
try:
    torch.ops.rlvrw.logits_forward(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0, False)
except NotImplementedError as exc:
    print("CPU refused:", "CUDA" in str(exc))
"""

NO_CUPY = r"""
import sys
sys.modules["rlvrw._C"] = None
sys.modules["cupy"] = None  # not installed
from rlvrw import _C_cupy, _C_loader
_C_cupy._why_not = lambda: None
assert _C_loader.load() is False and _C_loader.BACKEND is None
print(_C_loader.LOAD_ERROR)
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_loader_registers_the_ops_as_the_cuda_backend_with_cupy():
    run = run_python(REGISTER_WITH_FAKE_CUPY)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CPU refused: True" in run.stdout


def test_loader_without_cupy_says_why():
    run = run_python(NO_CUPY)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rlvrw._C" in run.stdout and "cupy fallback" in run.stdout and "cupy" in run.stdout.split("fallback")[1]


def test_fallback_off_switch(monkeypatch):
    monkeypatch.setenv(C.ENV_VAR, "0")
    assert C._why_not() == f"{C.ENV_VAR}=0"


# ---- GPU -------------------------------------------------------------------------------------------------------------
def _cupy_ready() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


needs_cupy = pytest.mark.skipif(not _cupy_ready(), reason="needs CUDA and cupy")

GPU_SUITE = r"""
import sys
sys.modules["rlvrw._C"] = None  # the NVRTC kernels even where the extension is built
from rlvrw import _C_loader
assert _C_loader.load() and _C_loader.BACKEND == "cupy", _C_loader.LOAD_ERROR
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", sys.argv[1] + "/tests/test_csrc_build.py",
                      sys.argv[1] + "/tests/test_fsq.py", sys.argv[1] + "/tests/test_cupy_backend.py",
                      "-k", "not runs_the_gpu_tests"]))
"""


@pytest.mark.gpu
@needs_cupy
def test_cupy_backend_runs_the_gpu_tests_of_the_extension():
    run = subprocess.run([sys.executable, "-c", GPU_SUITE, str(ROOT)], capture_output=True, text=True, timeout=1800,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 20, run.stdout[-3000:]


def _cuda_backend_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from rlvrw import _C_loader

    return _C_loader.load()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_backend_ready(), reason="needs CUDA and rlvrw._C or cupy")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_ops_match_the_reference(dtype):
    """Whichever serves ``cuda`` (extension or NVRTC): log-probs, entropy and the fused GRPO loss with gradients."""
    import rlvrw.ops as ops

    torch.manual_seed(0)
    n, t, v = 3, 5, 1531  # odd vocabulary: scalar heads and tails around the vector loads
    # The [:, :-1] slice of a (B, T + 1, V) output, read in place (strided rows, misaligned row starts); -inf logits
    # are test_csrc_build's masked rows.
    logits = (torch.randn(n, t + 1, v, device="cuda") * 3).to(dtype)[:, :-1]
    tokens = torch.randint(0, v, (n, t), device="cuda")
    results = {}
    for backend in ("cuda", "reference"):
        x = logits.detach().clone().requires_grad_() if backend == "reference" else logits.detach().requires_grad_()
        logp, entropy = ops.token_logprobs(x, tokens, temperature=0.7, return_entropy=True, backend=backend)
        (logp * torch.linspace(-1, 1, t, device="cuda")).sum().add(entropy.sum()).backward()
        results[backend] = (logp.float(), entropy.float(), x.grad.float())
    for got, want in zip(results["cuda"], results["reference"]):
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=2e-2)
