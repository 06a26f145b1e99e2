"""Attention backends and dtypes (rlvrw.models.attention).

- Backend choice, with fake ``flash_attn`` / ``xformers`` modules put in ``sys.modules``: the functions themselves
  must import (xformers can import without ``memory_efficient_attention``), flash needs compute capability >= 8.0,
  head_dim <= 256 and fp16/bf16; a forced backend that cannot run says why.
- Autocast: rotary embeddings keep their input's dtype, so an fp32 model under bf16 autocast hands q, k and v to
  every backend in one dtype; decoding through the KV cache under autocast equals the full forward under autocast.
  On CPU the flash and xformers paths run through fakes that refuse what the real kernels refuse.
- GPU (marked ``gpu``): the same fp32 model under bf16 autocast through the real flash-attn and xformers.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from rlvrw.models import WorldModelConfig, WorldModelTransformer
from rlvrw.models import attention as A

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh_detection():
    """Detection runs again under each test's sys.modules (and once more afterwards, for the next test)."""
    A._flash_attn.cache_clear()
    A._xformers_ops.cache_clear()
    yield
    A._flash_attn.cache_clear()
    A._xformers_ops.cache_clear()


# ---- fakes that refuse what the real kernels refuse ------------------------------------------------------------------
SEEN: list[tuple[str, tuple[torch.dtype, ...]]] = []


def _refuse_mixed(name: str, flash: bool, *tensors: torch.Tensor) -> None:
    dtypes = tuple(t.dtype for t in tensors)
    SEEN.append((name, dtypes))
    if flash and any(d not in (torch.float16, torch.bfloat16) for d in dtypes):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if len(set(dtypes)) > 1:
        raise ValueError("Query/Key/Value should either all have the same dtype")


def fake_flash_attn_func(q, k, v, causal=False):
    _refuse_mixed("flash_attn_func", True, q, k, v)
    assert causal
    return A.causal_attention(q, k, v, "sdpa")


def fake_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False):
    _refuse_mixed("flash_attn_with_kvcache", True, q, k_cache, v_cache, k, v)
    assert causal and cache_seqlens.dtype == torch.int32
    pos = cache_seqlens[:1].long()  # every row of a layout is at the same position
    visible = (torch.arange(k_cache.shape[1]) <= pos)[None]
    return A.cached_attention(q, k, v, k_cache, v_cache, pos, visible, "sdpa")


def fake_memory_efficient_attention(q, k, v, attn_bias=None):
    _refuse_mixed("memory_efficient_attention", False, q, k, v)
    assert isinstance(attn_bias, FakeLowerTriangularMask)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


class FakeLowerTriangularMask:
    pass


def module(name: str, **attrs) -> types.ModuleType:
    fake = types.ModuleType(name)
    fake.__dict__.update(attrs)
    return fake


def install(monkeypatch, flash: str = "ok", xformers: str = "ok", capability=(9, 0)) -> None:
    """flash / xformers: "ok" (every function), "partial" (the package imports, a function it needs is missing),
    "absent" (not installed). ``capability``: what every CUDA device (and, for the CPU fakes, the CPU) reports."""
    flash_attrs = dict(flash_attn_func=fake_flash_attn_func, flash_attn_with_kvcache=fake_flash_attn_with_kvcache)
    if flash == "partial":
        del flash_attrs["flash_attn_with_kvcache"]
    monkeypatch.setitem(sys.modules, "flash_attn", None if flash == "absent" else module("flash_attn", **flash_attrs))
    ops_attrs = dict(memory_efficient_attention=fake_memory_efficient_attention,
                     LowerTriangularMask=FakeLowerTriangularMask)
    if xformers == "partial":  # xformers > 0.0.35 without mslk: xformers.ops loads, memory_efficient_attention is gone
        del ops_attrs["memory_efficient_attention"]
    if xformers == "absent":
        monkeypatch.setitem(sys.modules, "xformers", None)
        monkeypatch.setitem(sys.modules, "xformers.ops", None)
    else:
        monkeypatch.setitem(sys.modules, "xformers", module("xformers"))
        monkeypatch.setitem(sys.modules, "xformers.ops", module("xformers.ops", **ops_attrs))
    monkeypatch.setattr(A, "_device_capability", lambda device: capability)
    SEEN.clear()


# ---- backend choice --------------------------------------------------------------------------------------------------
def test_auto_takes_flash_then_xformers_then_sdpa(monkeypatch):
    install(monkeypatch)
    assert A.resolve_attention_backend("auto", CUDA, torch.bfloat16, 64) == "flash"
    assert A.resolve_attention_backend("auto", CUDA, torch.float16, 256) == "flash"
    assert A.resolve_attention_backend("auto", CUDA, torch.float32, 64) == "xformers"  # flash has no fp32 kernels
    assert A.resolve_attention_backend("auto", CUDA, torch.bfloat16, 320) == "xformers"  # head_dim over 256
    monkeypatch.setattr(A, "_device_capability", lambda device: None if device.type != "cuda" else (9, 0))
    assert A.resolve_attention_backend("auto", CPU, torch.bfloat16, 64) == "sdpa"


@pytest.mark.parametrize("capability,expected", [((7, 5), "xformers"), ((8, 0), "flash"), ((8, 9), "flash"),
                                                 ((9, 0), "flash"), ((10, 0), "flash")])
def test_flash_needs_sm80(monkeypatch, capability, expected):
    install(monkeypatch, capability=capability)
    assert A.resolve_attention_backend("auto", CUDA, torch.bfloat16, 64) == expected


def test_xformers_without_memory_efficient_attention_is_absent(monkeypatch):
    """The package and xformers.ops import, the function does not (xformers > 0.0.35 without mslk)."""
    install(monkeypatch, flash="absent", xformers="partial")
    with pytest.warns(RuntimeWarning, match="memory_efficient_attention"):
        assert A.resolve_attention_backend("auto", CUDA, torch.bfloat16, 64) == "sdpa"
    with pytest.raises(ValueError, match="attention_backend='xformers' cannot run here.*memory_efficient_attention"):
        A.resolve_attention_backend("xformers", CUDA, torch.bfloat16, 64)


def test_flash_without_its_kvcache_function_is_absent(monkeypatch):
    install(monkeypatch, flash="partial")
    with pytest.warns(RuntimeWarning, match="flash_attn_with_kvcache"):
        assert A.resolve_attention_backend("auto", CUDA, torch.bfloat16, 64) == "xformers"


@pytest.mark.parametrize("setup,call,message", [
    (dict(flash="absent"), ("flash", CUDA, torch.bfloat16, 64), "flash_attn is not installed"),
    (dict(capability=(7, 5)), ("flash", CUDA, torch.bfloat16, 64), r"compute capability >= 8\.0, this one is 7\.5"),
    (dict(), ("flash", CUDA, torch.bfloat16, 512), "head_dim <= 256, got 512"),
    (dict(), ("flash", CUDA, torch.float32, 64), "fp16/bf16 tensors, got torch.float32"),
    (dict(capability=None), ("flash", CPU, torch.bfloat16, 64), "CUDA tensors, got tensors on cpu"),
    (dict(xformers="absent"), ("xformers", CUDA, torch.bfloat16, 64), "xformers is not installed"),
    (dict(capability=None), ("xformers", CPU, torch.float32, 64), "CUDA tensors, got tensors on cpu"),
    (dict(), ("triton", CUDA, torch.bfloat16, 64), "attention_backend must be one of"),
])
def test_forced_backend_says_why_it_cannot_run(monkeypatch, setup, call, message):
    install(monkeypatch, **setup)
    with pytest.raises(ValueError, match=message):
        A.resolve_attention_backend(*call)


def test_model_on_a_missing_backend(monkeypatch):
    """A model forced onto a missing backend says so when it runs; auto runs SDPA, bit for bit."""
    install(monkeypatch, flash="absent", xformers="absent")
    ids = random_ids(1, 8)
    with pytest.raises(ValueError, match="flash_attn is not installed"):
        WorldModelTransformer(WorldModelConfig(**TINY), attention_backend="flash")(ids)
    torch.manual_seed(0)
    auto = WorldModelTransformer(WorldModelConfig(**TINY))
    torch.manual_seed(0)
    sdpa = WorldModelTransformer(WorldModelConfig(**TINY), attention_backend="sdpa")
    torch.testing.assert_close(auto(ids), sdpa(ids), atol=0, rtol=0)


# ---- dtypes under autocast -------------------------------------------------------------------------------------------
def test_rotary_keeps_the_input_dtype():
    """bf16 projections rotated by fp32 tables (autocast with fp32 weights) come back bf16, rounded once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=gen).bfloat16()
    cos, sin = A.rotary_cos_sin(torch.arange(5), 8, 10000.0, torch.float32)
    rotated = A.apply_rotary(x, cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, A.apply_rotary(x.float(), cos, sin).bfloat16())
    assert A.apply_rotary(x.double(), cos.double(), sin.double()).dtype == torch.float64


def test_mixed_dtypes_are_refused_by_name():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="share one dtype.*'v': torch.bfloat16"):
        A.causal_attention(q, q, q.bfloat16(), "sdpa")


def _decode_matches_full_forward_under_autocast(model: WorldModelTransformer, device, atol: float):
    """fp32 ``model`` under bf16 autocast: the full forward is within ``atol`` of the float64 model, prefill and
    each decode step within ``atol`` of the full forward; a backward pass gives finite fp32 gradients."""
    reference = WorldModelTransformer(model.config, attention_backend="sdpa").to(device).double()
    reference.load_state_dict(model.state_dict())
    ids = random_ids(3, 30).to(device)
    expected = reference(ids).float()
    prompt_len = 18
    with torch.autocast(device.type, dtype=torch.bfloat16):
        full = model(ids)
        assert full.dtype == torch.bfloat16
        torch.testing.assert_close(full.float(), expected, atol=atol, rtol=0)
        full.float().logsumexp(-1).mean().backward()
        model.setup_cache(max_batch=4, max_len=40, dtype=torch.bfloat16)
        last = model.prefill(ids[:, :prompt_len])
        torch.testing.assert_close(last.float(), full[:, prompt_len - 1].float(), atol=atol, rtol=0)
        for pos in range(prompt_len, 30):
            logits = model.decode_step(ids[:, pos], torch.tensor(pos, device=device))
            torch.testing.assert_close(logits.float(), full[:, pos].float(), atol=atol, rtol=0)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and bool(g.isfinite().all()) for g in grads)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_decode_under_autocast_equals_full_forward(kv_heads):
    """On CPU with SDPA: decoding under autocast used to fail (fp32 keys written into the bf16 cache)."""
    torch.manual_seed(0)
    model = WorldModelTransformer(WorldModelConfig(**TINY, num_key_value_heads=kv_heads), attention_backend="sdpa")
    _decode_matches_full_forward_under_autocast(model, CPU, atol=2e-2)  # bf16 activations; logits std ~0.1


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_every_backend_gets_one_dtype_under_autocast(monkeypatch, backend):
    """The flash and xformers code paths on CPU, through fakes that raise as the real kernels do on mixed or fp32
    inputs: under bf16 autocast an fp32 model hands them bf16 q, k and v (and a bf16 cache)."""
    install(monkeypatch)
    torch.manual_seed(0)
    model = WorldModelTransformer(WorldModelConfig(**TINY, num_key_value_heads=2), attention_backend=backend)
    _decode_matches_full_forward_under_autocast(model, CPU, atol=2e-2)
    called = {name for name, _ in SEEN}
    expected = {"flash_attn_func", "flash_attn_with_kvcache"} if backend == "flash" else {"memory_efficient_attention"}
    assert called == expected  # (decoding under xformers runs SDPA)
    assert all(dtypes == (torch.bfloat16,) * len(dtypes) for _, dtypes in SEEN)


# ---- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "xformers", "sdpa"])
def test_fp32_model_under_bf16_autocast_on_gpu(backend):
    """The default of pre-training and the RL update: fp32 weights, bf16 autocast, through the real kernels."""
    if backend == "flash" and A._flash_attn().unavailable:
        pytest.skip(A._flash_attn().unavailable)
    if backend == "xformers" and A._xformers_ops().unavailable:
        pytest.skip(A._xformers_ops().unavailable)
    torch.manual_seed(0)
    config = WorldModelConfig(**{**TINY, "hidden_size": 256, "num_key_value_heads": 2})  # head_dim 64
    model = WorldModelTransformer(config, attention_backend=backend).cuda()
    _decode_matches_full_forward_under_autocast(model, CUDA, atol=3e-2)
