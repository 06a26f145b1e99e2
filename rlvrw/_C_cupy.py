"""The CUDA backend without a build: the torch-free kernels of ``csrc/`` compiled at first use with NVRTC through
``cupy.RawModule``, registered as the very ops ``rlvrw._C`` registers (``torch.ops.rlvrw.*``, schemas read from
``csrc/ops.cpp``). ``rlvrw._C_loader.load()`` calls ``register()`` when the extension was not built (a pip-installed
CUDA torch without nvcc); every ``backend="cuda"`` path then runs these kernels unchanged.

The kernels read and write the torch tensors in place: a launch passes their device pointers (``data_ptr()``) and
torch's current stream straight to ``cuLaunchKernel``, so nothing is copied or converted and CUDA graphs capture it.
What the C launchers in the .cu files do on the host (argument checks, launch shape, grid) is restated here:
``SHAPES``, ``grid_for``, ``valid_layout``, ``row_start``, ``row_grid``, ``elementwise_grid`` and ``gather_unit``, with
the limits read from the sources' constants (tests check them against the C code), and so is the glue of
``csrc/ops.cpp``: its checks, and ``rows_of``, which passes (N, V) or (B, T, V) logits with any strides but a unit one
along V (a ``[:, :-1]`` slice) as the kernels' ``RowLayout``, without a copy. Arguments are packed by parameter
name in the order and C types of each kernel's declaration (``rlvrw._nvrtc_source.kernels``), a struct's fields by
name too.

Bound (csrc as of this file): ``logits_forward_kernel<T, THREADS, BLOCK, kEntropy>``,
``logits_backward_kernel<T, THREADS, BLOCK, kEntropy>``, ``fsq_quantize_kernel<T>``,
``fsq_quantize_backward_kernel<T>``, ``fsq_codes_to_indices_kernel<T>``, ``fsq_indices_to_codes_kernel<T, I>``,
``fsq_gather_kernel<U, I>``; see ``OP_KERNELS`` and the launch functions for their parameters.

``RLVRW_CUPY=0`` turns the fallback off.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import os
import re
import threading
from pathlib import Path

import torch

from rlvrw import _nvrtc_source as source

ENV_VAR = "RLVRW_CUPY"
DEVICE_TYPE = "cuda"  # where the ops' tensors must live (CPU tests of the argument packing set "cpu")
# No fast math: the log-sum-exp and the entropy keep full fp32 accuracy (as the extension's build flags).
OPTIONS = ("--std=c++17",)
TYPE_NAMES = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
INDEX_TYPES = {torch.int32: "int32_t", torch.int64: "int64_t"}
C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "int32_t": ctypes.c_int32, "unsigned": ctypes.c_uint,
           "float": ctypes.c_float, "bool": ctypes.c_bool}
# choose_shape in csrc/logits_common.cuh and the dispatch in logits_*.cu: (largest vocab, THREADS, BLOCK).
SHAPES = ((8192, 32, 256), (32768, 256, 256), (None, 512, 512))
GATHER_UNITS = ((16, "uint4"), (8, "uint2"), (4, "uint32_t"), (2, "uint16_t"), (1, "uint8_t"))
# Which unit holds each kernel, and the ops (csrc/ops.cpp) whose Python implementations launch them.
UNIT_OF = {"logits_forward_kernel": "logits_forward.cu", "logits_backward_kernel": "logits_backward.cu",
           "fsq_quantize_kernel": "fsq.cu", "fsq_quantize_backward_kernel": "fsq.cu",
           "fsq_codes_to_indices_kernel": "fsq.cu", "fsq_indices_to_codes_kernel": "fsq.cu",
           "fsq_gather_kernel": "fsq.cu"}

ERROR: str | None = None
_state_lock = threading.Lock()
_library = None  # the torch.library.Library that holds the registrations (kept alive here)


# ---- launch geometry (the C launchers' host code) --------------------------------------------------------------------
def constant(name: str) -> int:
    for unit in source.UNITS:
        found = source.constants(unit)
        if name in found:
            return found[name]
    raise KeyError(f"csrc declares no constexpr {name}")


def logits_shape(vocab: int) -> tuple[int, int]:
    """(THREADS, BLOCK): threads per row and per block for a vocabulary (choose_shape)."""
    for limit, threads, block in SHAPES:
        if limit is None or vocab <= limit:
            return threads, block
    raise AssertionError("unreachable")


def grid_for(n_rows: int, rows_per_block: int) -> int:
    return int(min(max((n_rows + rows_per_block - 1) // rows_per_block, 1), constant("kMaxGridBlocks")))


def row_grid(n_rows: int) -> int:
    per_block = constant("kFsqRowsPerBlock")
    return int(min((n_rows + per_block - 1) // per_block, constant("kMaxGridBlocks")))


def elementwise_grid(n: int, threads: int) -> int:
    per_block = threads * constant("kFsqElementsPerThread")
    return int(min(max((n + per_block - 1) // per_block, 1), constant("kMaxGridBlocks")))


def valid_layout(n_rows: int, vocab: int, rows_per_seq: int, seq_stride: int, row_stride: int) -> bool:
    """valid_layout of csrc/logits_common.cuh: at least one row per sequence, non-negative strides, and rows of one
    sequence that do not overlap."""
    if rows_per_seq < 1 or seq_stride < 0 or row_stride < 0:
        return False
    return min(n_rows, rows_per_seq) <= 1 or row_stride >= vocab


def row_start(row: int, layout: dict[str, int]) -> int:
    """row_start of csrc/logits_common.cuh: the element offset of row ``row`` in a RowLayout."""
    seq = row // layout["rows_per_seq"]
    return seq * layout["seq_stride"] + (row - seq * layout["rows_per_seq"]) * layout["row_stride"]


def gather_unit(table_ptr: int, out_ptr: int, row_bytes: int) -> tuple[int, str]:
    """The widest copy unit (bytes, C type) dividing the row size and both addresses."""
    bits = table_ptr | out_ptr | row_bytes
    return next((size, name) for size, name in GATHER_UNITS if bits % size == 0)


# ---- NVRTC through cupy ----------------------------------------------------------------------------------------------
def include_dirs() -> list[str]:
    """Folders with the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h): a toolkit named by CUDA_HOME /
    CUDA_PATH, the NVIDIA runtime wheels a CUDA torch installs, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates = [str(Path(c) / "include") for c in candidates if c]
    try:
        nvidia = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        nvidia = None
    for root in (nvidia.submodule_search_locations or []) if nvidia is not None else []:
        candidates += [str(p) for p in sorted(Path(root).glob("*/include"))]
    candidates.append("/usr/local/cuda/include")
    found = [c for c in candidates if all((Path(c) / h).is_file() for h in source.PROVIDED_HEADERS)]
    return found[:1]


class Launcher:
    """Compiles kernel instantiations with ``cupy.RawModule`` (once per device) and launches them by parameter name."""

    def __init__(self, cupy, includes: list[str]):
        self.cupy = cupy
        self.options = OPTIONS + tuple(f"-I{d}" for d in includes)
        self._functions: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()

    def function(self, kernel: str, template: tuple, device: int):
        unit = UNIT_OF[kernel]
        expression = source.expression(source.kernels(unit)[kernel], *template)
        key = (device, expression)
        found = self._functions.get(key)
        if found is None:
            with self._lock, self.cupy.cuda.Device(device):
                module = self.cupy.RawModule(code=source.translation_unit(unit), options=self.options,
                                             name_expressions=[expression])
                found = self._functions.setdefault(key, module.get_function(expression))
        return found

    def __call__(self, kernel: str, template: tuple, grid: int, block: int, shared_mem: int, tensor: torch.Tensor,
                 **args) -> None:
        decl = source.kernels(UNIT_OF[kernel])[kernel]
        names = [p.name for p in decl.params]
        if set(args) != set(names):
            raise TypeError(f"{decl.name} takes ({', '.join(names)}); the glue passes ({', '.join(args)}): "
                            "update rlvrw._C_cupy to the kernel's signature")
        values = [pack(p, args[p.name], UNIT_OF[kernel]) for p in decl.params]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        device, stream = launch_context(tensor)
        function = self.function(kernel, template, device)
        with self.cupy.cuda.Device(device):
            self.cupy.cuda.driver.launchKernel(function.ptr, grid, 1, 1, block, 1, 1, shared_mem, stream,
                                               ctypes.addressof(params), 0)


def launch_context(tensor: torch.Tensor) -> tuple[int, int]:
    """(device index, handle of torch's current stream on it) for a launch on ``tensor``'s device."""
    device = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return device, torch.cuda.current_stream(device).cuda_stream


def instantiations() -> list[tuple[str, tuple]]:
    """Every (kernel, template arguments) the ops here may launch."""
    shapes = [(threads, block) for _, threads, block in SHAPES]
    found = [(k, (t, threads, block, e)) for k in ("logits_forward_kernel", "logits_backward_kernel")
             for t in TYPE_NAMES.values() for threads, block in shapes for e in (True, False)]
    found += [(k, (t,)) for k in ("fsq_quantize_kernel", "fsq_quantize_backward_kernel", "fsq_codes_to_indices_kernel")
              for t in TYPE_NAMES.values()]
    found += [("fsq_indices_to_codes_kernel", (t, i)) for t in TYPE_NAMES.values() for i in INDEX_TYPES.values()]
    found += [("fsq_gather_kernel", (u, i)) for _, u in GATHER_UNITS for i in INDEX_TYPES.values()]
    return found


def struct_type(unit: str, name: str):
    fields = source.structs(unit)[name]
    return type(name, (ctypes.Structure,), {"_fields_": [(f, C_TYPES[t]) for t, f in fields]})


def pack(param: source.Param, value, unit: str):
    """``value`` as the C object the kernel parameter expects (a pointer is an address, 0 for NULL)."""
    if param.is_pointer:
        return ctypes.c_void_p(int(value))
    if param.type in C_TYPES:
        return C_TYPES[param.type](value)
    if param.type in source.structs(unit):
        if not isinstance(value, dict):
            return struct_type(unit, param.type)(*value)
        fields = [f for _, f in source.structs(unit)[param.type]]
        if set(value) != set(fields):
            raise TypeError(f"{param.type} {param.name} has fields ({', '.join(fields)}); the glue passes "
                            f"({', '.join(value)}): update rlvrw._C_cupy to the struct")
        return struct_type(unit, param.type)(**value)
    raise TypeError(f"kernel parameter {param.name} has type {param.type}, which rlvrw._C_cupy cannot pack")


_launch: Launcher | None = None


# ---- the ops (csrc/ops.cpp) ------------------------------------------------------------------------------------------
def _check(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(f"rlvrw: {message}")


def _type_name(dtype: torch.dtype) -> str:
    _check(dtype in TYPE_NAMES, f"the tensor must be float32, bfloat16 or float16, got {dtype}")
    return TYPE_NAMES[dtype]


def rows_of(t: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(N, V) or (B, T, V) logits as rows of a (B, T) grid (rows_of in ops.cpp): the row count and the kernels'
    RowLayout, so that the [:, :-1] slice of a (B, T + 1, V) tensor is read in place."""
    if t.dim() == 2:
        return t.size(0), dict(rows_per_seq=max(t.size(0), 1), seq_stride=0, row_stride=t.stride(0))
    return t.size(0) * t.size(1), dict(rows_per_seq=max(t.size(1), 1), seq_stride=t.stride(0), row_stride=t.stride(1))


def rows_extent_bytes(t: torch.Tensor) -> int:
    """One past the last element of the rows, in bytes from the data pointer (for the overlap check)."""
    last = t.size(-1) + sum((t.size(d) - 1) * t.stride(d) for d in range(t.dim() - 1))
    return last * t.element_size()


def _check_logits(t: torch.Tensor, name: str) -> None:
    _check(t.device.type == DEVICE_TYPE, f"{name} must be a CUDA tensor, got {t.device}")
    _check(t.dim() in (2, 3), f"{name} must be (N, V) or (B, T, V), got shape {tuple(t.shape)}")
    _check(t.size(-1) <= 1 or t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    _check(all(t.stride(d) >= 0 for d in range(t.dim() - 1)), f"{name} has a negative stride: {t.stride()}")
    row_dim = t.dim() - 2
    _check(t.size(row_dim) <= 1 or t.size(-1) == 0 or t.stride(row_dim) >= t.size(-1),
           f"{name} rows overlap (stride {t.stride(row_dim)} < V = {t.size(-1)})")
    _check(t.size(-1) <= 2**31 - 1, "vocabulary larger than 2^31-1 is not supported")


def _per_row(t: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    n = rows_of(logits)[0]
    _check(t.device == logits.device, f"{name} must be on {logits.device}, got {t.device}")
    _check(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    _check(t.dim() == 1 and t.size(0) == n, f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.contiguous()


def _check_launch(ok: bool, function: str) -> None:
    """What check_cuda in ops.cpp reports when the C API refuses its arguments (cudaErrorInvalidValue)."""
    _check(ok, f"{function} failed: invalid argument")


def logits_forward(logits, tokens, inv_temperature, with_entropy):
    _check_logits(logits, "logits")
    type_name = _type_name(logits.dtype)
    tok = _per_row(tokens, logits, torch.int64, "tokens")
    n, layout = rows_of(logits)
    v = logits.size(-1)
    logp = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    if n == 0:
        return logp, lse, entropy
    _check_launch(valid_layout(n, v, **layout), "rlvrw_logits_forward")
    threads, block = logits_shape(v)
    _launch("logits_forward_kernel", (type_name, threads, block, bool(with_entropy)), grid_for(n, block // threads),
            block, 0, logits, logits=logits.data_ptr(), n_rows=n, vocab=v, layout=layout, tokens=tok.data_ptr(),
            inv_t=float(inv_temperature), logp=logp.data_ptr(), lse=lse.data_ptr(),
            entropy=entropy.data_ptr() if with_entropy else 0)
    return logp, lse, entropy


def _check_no_partial_overlap(logits: torch.Tensor, grad: torch.Tensor) -> None:
    """In place (the same buffer, same layout) or into a buffer that does not overlap the logits at all."""
    if grad.data_ptr() == logits.data_ptr():
        (_, layout), (_, grad_layout) = rows_of(logits), rows_of(grad)
        _check(grad_layout["seq_stride"] == layout["seq_stride"] and grad_layout["row_stride"] == layout["row_stride"],
               "in-place grad_logits must have the logits' strides")
        return
    if grad.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
        return
    lo_a, lo_b = logits.data_ptr(), grad.data_ptr()
    hi_a, hi_b = lo_a + rows_extent_bytes(logits), lo_b + rows_extent_bytes(grad)
    _check(hi_a <= lo_b or hi_b <= lo_a,
           "grad_logits partially overlaps logits; pass logits itself for an in-place backward")


def logits_backward_(logits, tokens, inv_temperature, lse, grad_logp, entropy, grad_entropy, grad_logits):
    _check_logits(logits, "logits")
    _check_logits(grad_logits, "grad_logits")
    type_name = _type_name(logits.dtype)
    _check(grad_logits.dtype == logits.dtype, f"grad_logits must have the logits dtype {logits.dtype}, "
           f"got {grad_logits.dtype}")
    _check(grad_logits.shape == logits.shape, f"grad_logits must have the logits shape {tuple(logits.shape)}, "
           f"got {tuple(grad_logits.shape)}")
    _check(grad_logits.device == logits.device, f"grad_logits must be on {logits.device}")
    tok = _per_row(tokens, logits, torch.int64, "tokens")
    lse_c = _per_row(lse, logits, torch.float32, "lse")
    glp = _per_row(grad_logp, logits, torch.float32, "grad_logp")
    with_entropy = grad_entropy is not None
    if with_entropy:
        _check(entropy is not None, "logits_backward_ needs the forward's entropy when grad_entropy is given")
        ent_c = _per_row(entropy, logits, torch.float32, "entropy")
        ge_c = _per_row(grad_entropy, logits, torch.float32, "grad_entropy")
    (n, layout), (_, grad_layout) = rows_of(logits), rows_of(grad_logits)
    v = logits.size(-1)
    if n == 0 or v == 0:
        return
    _check_no_partial_overlap(logits, grad_logits)
    _check_launch(valid_layout(n, v, **layout) and valid_layout(n, v, **grad_layout), "rlvrw_logits_backward")
    threads, block = logits_shape(v)
    _launch("logits_backward_kernel", (type_name, threads, block, with_entropy), grid_for(n, block // threads),
            block, 0, logits, logits=logits.data_ptr(), layout=layout, grad=grad_logits.data_ptr(),
            grad_layout=grad_layout, n_rows=n, vocab=v, tokens=tok.data_ptr(), inv_t=float(inv_temperature),
            lse=lse_c.data_ptr(), grad_logp=glp.data_ptr(), entropy=ent_c.data_ptr() if with_entropy else 0,
            grad_entropy=ge_c.data_ptr() if with_entropy else 0)


def _check_rows(t: torch.Tensor, name: str) -> None:
    _check(t.device.type == DEVICE_TYPE, f"{name} must be a CUDA tensor, got {t.device}")
    _check(t.dim() == 3, f"{name} must be 3-D (B, S, d), got shape {tuple(t.shape)}")
    _check(1 <= t.size(2) <= constant("kFsqMaxDims"), f"{name}: d must be in [1, {constant('kFsqMaxDims')}]")


def _check_constants(consts, ints, d: int, device) -> None:
    _check(consts.device == device and (ints is None or ints.device == device), f"FSQ constants must be on {device}")
    _check(consts.dtype == torch.float32 and consts.is_contiguous() and tuple(consts.shape) == (4, d),
           f"consts must be a contiguous float32 (4, {d}) tensor, got {tuple(consts.shape)}")
    _check(ints is None or (ints.dtype == torch.int32 and ints.is_contiguous() and tuple(ints.shape) == (2, d)),
           f"ints must be a contiguous int32 (2, {d}) tensor")


def _fsq_shape(t: torch.Tensor) -> tuple[int, int, int]:
    return t.size(0) * t.size(1), t.size(1), t.size(2)


def fsq_quantize(z, consts, ints):
    _check_rows(z, "z")
    type_name = _type_name(z.dtype)
    _check_constants(consts, ints, z.size(2), z.device)
    codes = torch.empty_like(z)
    indices = torch.empty(z.shape[:2], device=z.device, dtype=torch.int32)
    shape = _fsq_shape(z)
    if shape[0] == 0:
        return codes, indices
    _launch("fsq_quantize_kernel", (type_name,), row_grid(shape[0]), constant("kFsqRowsPerBlock"),
            4 * constant("kFsqRowsPerBlock") * shape[2], z, z=z.data_ptr(), zs=z.stride(), codes=codes.data_ptr(),
            cs=codes.stride(), indices=indices.data_ptr(), sh=shape, consts=consts.data_ptr(), ints=ints.data_ptr())
    return codes, indices


def fsq_quantize_backward(z, grad_codes, consts):
    _check_rows(z, "z")
    type_name = _type_name(z.dtype)
    _check(grad_codes.shape == z.shape and grad_codes.dtype == z.dtype and grad_codes.device == z.device,
           "grad_codes must match z in shape, dtype and device")
    _check_constants(consts, None, z.size(2), z.device)
    grad_z = torch.empty_like(z)
    shape = _fsq_shape(z)
    if shape[0] == 0:
        return grad_z
    _launch("fsq_quantize_backward_kernel", (type_name,), elementwise_grid(shape[0] * shape[2], 256), 256, 0, z,
            z=z.data_ptr(), zs=z.stride(), grad=grad_codes.data_ptr(), gs=grad_codes.stride(), dz=grad_z.data_ptr(),
            ds=grad_z.stride(), sh=shape, consts=consts.data_ptr())
    return grad_z


def fsq_codes_to_indices(codes, consts, ints):
    _check_rows(codes, "codes")
    type_name = _type_name(codes.dtype)
    _check_constants(consts, ints, codes.size(2), codes.device)
    indices = torch.empty(codes.shape[:2], device=codes.device, dtype=torch.int32)
    shape = _fsq_shape(codes)
    if shape[0] == 0:
        return indices
    _launch("fsq_codes_to_indices_kernel", (type_name,), row_grid(shape[0]), constant("kFsqRowsPerBlock"),
            4 * constant("kFsqRowsPerBlock") * shape[2], codes, codes=codes.data_ptr(), cs=codes.stride(),
            indices=indices.data_ptr(), sh=shape, consts=consts.data_ptr(), ints=ints.data_ptr())
    return indices


def _check_indices(indices: torch.Tensor) -> None:
    _check(indices.device.type == DEVICE_TYPE, f"indices must be a CUDA tensor, got {indices.device}")
    _check(indices.dim() == 1, f"indices must be 1-D, got shape {tuple(indices.shape)}")
    _check(indices.dtype in INDEX_TYPES, f"indices must be int32 or int64, got {indices.dtype}")


def fsq_indices_to_codes(indices, consts, ints, codebook_size, dtype):
    _check_indices(indices)
    type_name = _type_name(dtype)
    d = consts.size(1)
    _check_constants(consts, ints, d, indices.device)
    _check(1 <= d <= constant("kFsqMaxDims") and codebook_size >= 1, "bad FSQ levels or codebook_size")
    n = indices.size(0)
    codes = torch.empty(n, d, device=indices.device, dtype=dtype)
    if n == 0:
        return codes
    _launch("fsq_indices_to_codes_kernel", (type_name, INDEX_TYPES[indices.dtype]), elementwise_grid(n * d, 256),
            256, 0, indices, indices=indices.data_ptr(), index_stride=indices.stride(0), n=n, d=d,
            codebook_size=codebook_size, codes=codes.data_ptr(), consts=consts.data_ptr(), ints=ints.data_ptr())
    return codes


def fsq_gather(indices, table):
    _check_indices(indices)
    _check(table.device == indices.device, f"table must be on {indices.device}")
    _check(table.dim() == 2 and table.size(0) >= 2 and table.is_contiguous(),
           f"table must be a contiguous (codebook_size + 1, C) tensor, got {tuple(table.shape)}")
    n = indices.size(0)
    out = torch.empty(n, table.size(1), device=table.device, dtype=table.dtype)
    row_bytes = table.size(1) * table.element_size()
    if n == 0 or row_bytes == 0:
        return out
    unit_bytes, unit = gather_unit(table.data_ptr(), out.data_ptr(), row_bytes)
    units = row_bytes // unit_bytes
    _launch("fsq_gather_kernel", (unit, INDEX_TYPES[indices.dtype]), elementwise_grid(n * units, 256), 256, 0,
            indices, indices=indices.data_ptr(), index_stride=indices.stride(0), n=n,
            codebook_size=table.size(0) - 1, table=table.data_ptr(), units_per_row=units, out=out.data_ptr())
    return out


IMPLEMENTATIONS = {f.__name__: f for f in (logits_forward, logits_backward_, fsq_quantize, fsq_quantize_backward,
                                           fsq_codes_to_indices, fsq_indices_to_codes, fsq_gather)}


# ---- registration ----------------------------------------------------------------------------------------------------
def schemas() -> dict[str, str]:
    """The op schemas of csrc/ops.cpp (its TORCH_LIBRARY m.def strings), by op name."""
    text = (source.csrc_dir() / "ops.cpp").read_text()
    block = re.search(r"TORCH_LIBRARY\(rlvrw,\s*m\)\s*\{(.*?)\n\}", text, re.S)
    if block is None:
        raise ValueError("csrc/ops.cpp has no TORCH_LIBRARY(rlvrw, m) block")
    found = {}
    for call in re.findall(r"m\.def\(((?:\s*\"(?:[^\"\\]|\\.)*\")+)\s*\)", block.group(1)):
        schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", call))
        found[schema.split("(", 1)[0].strip()] = schema
    return found


def schema_arguments(schema: str) -> list[str]:
    """Argument names of a schema: 'f(Tensor a, float b) -> ()' gives ['a', 'b']."""
    inner = schema.split("(", 1)[1].rsplit(") ->", 1)[0]
    return [arg.split("=")[0].split()[-1] for arg in source._split_top(inner)]


def check_bindings() -> None:
    """Every op of ops.cpp has an implementation here with its argument names, and every bound kernel exists."""
    ops = schemas()
    if set(ops) != set(IMPLEMENTATIONS):
        raise RuntimeError(f"csrc/ops.cpp defines {sorted(ops)}; rlvrw._C_cupy implements {sorted(IMPLEMENTATIONS)}")
    for name, schema in ops.items():
        params = list(inspect.signature(IMPLEMENTATIONS[name]).parameters)
        if params != schema_arguments(schema):
            raise RuntimeError(f"{name}: csrc/ops.cpp declares ({', '.join(schema_arguments(schema))}), "
                               f"rlvrw._C_cupy implements ({', '.join(params)})")
    for kernel, unit in UNIT_OF.items():
        if kernel not in source.kernels(unit):
            raise RuntimeError(f"csrc/{unit} has no kernel {kernel}")


def _why_not() -> str | None:
    if os.environ.get(ENV_VAR, "").strip() == "0":
        return f"{ENV_VAR}=0"
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def register() -> bool:
    """Register ``torch.ops.rlvrw.*`` backed by NVRTC-compiled kernels; True when they are. Never raises: the reason
    for False is in ``ERROR``. One kernel is compiled and run first, so a broken NVRTC setup is reported here and
    registers nothing."""
    global ERROR, _launch, _library
    with _state_lock:
        if _library is not None:
            return True
        try:
            reason = _why_not()
            if reason is None:
                cupy = importlib.import_module("cupy")
                includes = include_dirs()
                if not includes:
                    reason = ("the CUDA headers cuda_fp16.h / cuda_bf16.h were not found (set CUDA_HOME, or install "
                              "cupy-cuda12x[ctk] / nvidia-cuda-runtime)")
            if reason is not None:
                ERROR = reason
                return False
            check_bindings()
            _launch = Launcher(cupy, includes)
            _smoke_test()
            library = torch.library.Library("rlvrw", "DEF")
            for name, schema in schemas().items():
                library.define(schema)
                library.impl(name, IMPLEMENTATIONS[name], "CUDA")
            _library = library
        except Exception as exc:  # noqa: BLE001 - cupy missing, NVRTC failing, a schema clash: no fallback then
            ERROR = f"{type(exc).__name__}: {exc}"
            return False
        ERROR = None
        return True


def _smoke_test() -> None:
    logits = torch.tensor([[0.0, 0.0, float("-inf")]], device="cuda")
    logp, lse, _ = logits_forward(logits, torch.tensor([1], device="cuda"), 1.0, False)
    expected = torch.log(torch.tensor(2.0)).item()
    if abs(lse.item() - expected) > 1e-6 or abs(logp.item() + expected) > 1e-6:
        raise RuntimeError(f"the NVRTC-compiled forward gave lse {lse.item()}, logp {logp.item()}; expected "
                           f"{expected}, {-expected}")
