"""The world model's attention kernels and rotary embeddings.

Three backends compute causal attention: flash-attn (``flash_attn_func``; ``flash_attn_with_kvcache`` when
decoding), xformers (``memory_efficient_attention``) and PyTorch's ``scaled_dot_product_attention`` (SDPA, always
there). ``resolve_attention_backend`` picks one per call:

- ``"auto"``: flash when its functions import, the tensors are fp16/bf16 on a GPU of compute capability 8.0 or newer
  (flash-attn 2 has no kernels for older GPUs) and the head dim is at most 256; else xformers when its function
  imports and the tensors are on a GPU; else SDPA.
- ``"flash"``, ``"xformers"``, ``"sdpa"``: that one, or a ValueError saying why it cannot run.

"Imports" means the function itself: a package can import without it (xformers after 0.0.35 loads without
``memory_efficient_attention`` when its ``mslk`` dependency is missing). A package that is installed but whose
functions fail to import is reported once with a warning, then treated as absent.

Under autocast the projections come out in the autocast dtype while the rotary tables stay in the parameters'
dtype; ``apply_rotary`` returns its input's dtype, so q, k and v reach every backend in one dtype (flash-attn and
xformers refuse mixed dtypes; SDPA would silently promote).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "flash", "xformers", "sdpa")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2: Ampere, Ada, Hopper and newer
FLASH_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------------------------
# Backend detection
# ----------------------------------------------------------------------------------------------------------------------


def _installed(package: str) -> bool:
    if package in sys.modules:  # None there: imports of it are blocked
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _import_functions(package: str, module: str, names: tuple[str, ...]) -> SimpleNamespace:
    """``module``'s functions ``names`` as attributes, plus ``unavailable``: None, or why they cannot be used."""
    if not _installed(package):
        return SimpleNamespace(unavailable=f"{package} is not installed")
    try:
        loaded = importlib.import_module(module)
        functions = {name: getattr(loaded, name) for name in names}
    except Exception as err:  # ImportError, a missing function, or a build that does not load against this torch
        why = (f"{package} is installed but `from {module} import {', '.join(names)}` failed: "
               f"{type(err).__name__}: {err}")
        warnings.warn(f"rlvrw: attention backend unavailable: {why}", RuntimeWarning, stacklevel=3)
        return SimpleNamespace(unavailable=why)
    return SimpleNamespace(unavailable=None, **functions)


@functools.cache
def _flash_attn() -> SimpleNamespace:
    """flash-attn's ``flash_attn_func`` and ``flash_attn_with_kvcache`` (imported on first use only)."""
    return _import_functions("flash_attn", "flash_attn", ("flash_attn_func", "flash_attn_with_kvcache"))


@functools.cache
def _xformers_ops() -> SimpleNamespace:
    """xformers' ``memory_efficient_attention`` and its ``LowerTriangularMask``."""
    return _import_functions("xformers", "xformers.ops", ("memory_efficient_attention", "LowerTriangularMask"))


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device, None for other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def _flash_misfit(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flash-attn cannot run these tensors (None when it can)."""
    if _flash_attn().unavailable:
        return _flash_attn().unavailable
    capability = _device_capability(device)
    if capability is None:
        return f"flash-attn needs CUDA tensors, got tensors on {device}"
    if capability < FLASH_MIN_CAPABILITY:
        return (f"flash-attn needs a GPU of compute capability >= {FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]}, "
                f"this one is {capability[0]}.{capability[1]}")
    if dtype not in FLASH_DTYPES:
        return f"flash-attn needs fp16/bf16 tensors, got {dtype} (run under autocast or cast the model)"
    if head_dim > FLASH_MAX_HEAD_DIM:
        return f"flash-attn supports head_dim <= {FLASH_MAX_HEAD_DIM}, got {head_dim}"
    return None


def _xformers_misfit(device: torch.device) -> str | None:
    if _xformers_ops().unavailable:
        return _xformers_ops().unavailable
    if _device_capability(device) is None:
        return f"xformers needs CUDA tensors, got tensors on {device}"
    return None


def resolve_attention_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend that ``requested`` ("auto" or a name) means for q, k, v of ``dtype`` and ``head_dim`` on
    ``device``; a named backend that cannot run them raises a ValueError that says why."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, got {requested!r}")
    if requested == "auto":
        if _flash_misfit(device, dtype, head_dim) is None:
            return "flash"
        if _xformers_misfit(device) is None:
            return "xformers"
        return "sdpa"
    misfit = {"flash": lambda: _flash_misfit(device, dtype, head_dim), "xformers": lambda: _xformers_misfit(device),
              "sdpa": lambda: None}[requested]()
    if misfit is not None:
        raise ValueError(f"attention_backend={requested!r} cannot run here: {misfit}")
    return requested


# ----------------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------------


def _check_one_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"attention inputs must share one dtype, got {dtypes}")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal self-attention of a whole sequence: q (B, T, H, D), k and v (B, T, Hkv, D) -> (B, T, H, D).

    Query head h reads key/value head h // (H // Hkv), as in Hugging Face's LLaMA. Scale 1/sqrt(D).
    """
    _check_one_dtype(q=q, k=k, v=v)
    if backend == "flash":
        return _flash_attn().flash_attn_func(q, k, v, causal=True)
    if backend == "xformers":
        xops = _xformers_ops()
        k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
        return xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=k.shape[2] != q.shape[2]
    )
    return out.transpose(1, 2)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    visible: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """One new token per row at position ``pos``: q (n, 1, H, D), k and v (n, 1, Hkv, D) are written into the caches
    (n, max_len, Hkv, D) at ``pos``, then q attends to cache positions [0, pos]. ``visible`` (1, max_len) bool is
    ``arange(max_len) <= pos``. Static shapes throughout: positions past ``pos`` are masked, not skipped."""
    _check_one_dtype(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if backend == "flash":
        cached_tokens = pos.to(torch.int32).expand(q.shape[0]).contiguous()
        return _flash_attn().flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cached_tokens, causal=True
        )
    k_cache.index_copy_(1, pos, k)
    v_cache.index_copy_(1, pos, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=visible,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def _repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, Hkv, D) -> (B, T, H, D), each key/value head repeated for the query heads that read it."""
    return x if x.shape[2] == num_heads else x.repeat_interleave(num_heads // x.shape[2], dim=2)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary embeddings
# ----------------------------------------------------------------------------------------------------------------------


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin (T, head_dim) for integer ``positions`` (T,), computed in fp32 the way Hugging Face's LLaMA does
    (so its checkpoints give the same numbers), then cast to ``dtype``. Computed per call, not kept as a buffer, so
    that ``model.to(bfloat16)`` cannot round the frequencies."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, D) by position: the two halves of the last dim are the pair (Hugging Face's layout,
    which its checkpoints' q/k weights are permuted for). Returns x's dtype: under autocast x is a bf16 projection
    while cos/sin are fp32, and the rotation is then computed in fp32 and rounded once."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    first, second = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)
