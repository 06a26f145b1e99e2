"""The world model: a LLaMA decoder over frame and action tokens that loads Hugging Face LlamaForCausalLM checkpoints.

Architecture (LLaMA, as in RLVR-World's video world models): a token embedding, then L blocks of

    x = x + o_proj(causal_attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))     n = rms_norm(x)
    x = x + down_proj(silu(gate_proj(n)) * up_proj(n))                                n = rms_norm(x)

then a final RMSNorm and an output layer untied from the embedding. ``WorldModelConfig()`` is the paper's size
(12 layers, hidden 768, 12 heads, FFN 3072: 120.4M parameters with the 4633-token vocabulary); ``.small()`` fits a CPU.

Parameter names are Hugging Face's (``model.layers.3.self_attn.q_proj.weight``, ``lm_head.weight``), so
``from_pretrained`` reads a LlamaForCausalLM directory (``config.json`` + safetensors, e.g. the reference's
thuml/rt1-world-model-* checkpoints) as is, and ``save_pretrained`` writes one that ``transformers`` reads.

    logits = model(ids)                               # ids (B, T) -> (B, T, V)
    logits, hidden = model(ids, return_hidden=True)   # hidden (B, T, H): the final norm's output, lm_head's input
    hidden = model(ids, return_logits=False)          # never makes the (B, T, V) logits; score with
    logp = ops.linear_token_logprobs(hidden, model.lm_head.weight, targets)

Sampling uses one static, preallocated ``KVCache`` (``model.kv_cache``) that holds all decoding state; prefill and
the decode step are one forward path that writes into it. The decode step has static shapes, takes its position as a
tensor and has no data-dependent Python branch, so it can be captured in a CUDA graph:

    model.setup_cache(max_batch, max_len)       # model.kv_cache: keys, values (max_batch, max_len, kv_heads, head_dim)
    last = model.prefill(prompts)               # prompts (B, P) -> logits (B, V) at position P-1; fills slots [0, B)
    model.expand_cache(group_size)              # copies prompt b's cache to slots b*G .. b*G+G-1, without recompute
    logits = model.decode_step(tokens, pos)     # tokens (n,) at position pos (0-d int64 tensor) -> logits (n, V)
    model.free_cache()                          # model.kv_cache = None

Attention runs through flash-attn (``flash_attn_func``; ``flash_attn_with_kvcache`` when decoding) when it is
installed and the tensors are fp16/bf16 on a GPU of compute capability >= 8.0 with head_dim <= 256, else xformers'
``memory_efficient_attention`` when installed and on a GPU, else PyTorch's ``scaled_dot_product_attention`` (see
``rlvrw.models.attention``); the decode step under xformers uses SDPA (one query per row against a masked cache is
not what xformers' kernels are for). ``attention_backend`` forces one ("flash", "xformers", "sdpa"). Under autocast
with fp32 weights attention runs in the autocast dtype, q, k and v alike.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlvrw.models.attention import (
    ATTENTION_BACKENDS,
    apply_rotary,
    cached_attention,
    causal_attention,
    resolve_attention_backend,
    rotary_cos_sin,
)
from rlvrw.models.copy_prior import decode_copy_ids, sequence_copy_ids
from rlvrw.models.hf_weights import read_hf_weights
from rlvrw import checks


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class WorldModelConfig:
    """Sizes of the transformer; the field names are Hugging Face ``LlamaConfig``'s. Defaults: RLVR-World's model."""

    vocab_size: int = 4633
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 8192  # the reference's; sequences are 1654 (single-step) or 2024 tokens
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    # Not a LlamaConfig field: the learned copy prior (Decoder.copy_embed, rlvrw.models.copy_prior); 0 (off) for
    # every plain Llama checkpoint
    copy_prior_offset: int = 0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                 f"({self.num_attention_heads}) unless head_dim is given")
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            checks.integer(name, getattr(self, name))
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        checks.integer("copy_prior_offset", self.copy_prior_offset, low=0)
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            checks.positive(name, getattr(self, name))

    @classmethod
    def small(cls, **overrides) -> WorldModelConfig:
        """A CPU-sized model (4 layers, hidden 256, 4 heads, FFN 1024: 6.6M parameters with vocab 4633)."""
        sizes = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
        return cls(**{**sizes, **overrides})

    @classmethod
    def from_hf_dict(cls, hf: dict) -> WorldModelConfig:
        """From a Hugging Face LlamaConfig dict (``config.json``, transformers 4 or 5); refuses what the model lacks."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json: model_type must be 'llama', got {hf.get('model_type')!r}")
        unsupported = {
            "hidden_act": (hf.get("hidden_act", "silu") != "silu", "only 'silu' (SwiGLU) is implemented"),
            "attention_bias": (bool(hf.get("attention_bias")), "projections have no bias"),
            "mlp_bias": (bool(hf.get("mlp_bias")), "projections have no bias"),
            "tie_word_embeddings": (bool(hf.get("tie_word_embeddings")), "the output layer is untied"),
            "rope_scaling": (bool(hf.get("rope_scaling")), "only plain rotary embeddings are implemented"),
        }
        rope = hf.get("rope_parameters") or {}
        unsupported["rope_parameters"] = (
            rope.get("rope_type", "default") != "default", "only rope_type 'default' is implemented")
        for key, (bad, why) in unsupported.items():
            if bad:
                raise ValueError(f"config.json: {key}={hf.get(key)!r} is not supported ({why})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in fields and v is not None}
        if "rope_theta" in rope:  # transformers 5 keeps it there
            kwargs["rope_theta"] = rope["rope_theta"]
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """A Hugging Face LlamaConfig dict that transformers 4 and 5 read (a copy prior's weights only rlvrw reads)."""
        fields = dataclasses.asdict(self)
        if not self.copy_prior_offset:
            del fields["copy_prior_offset"]  # a plain Llama config, as it was before the copy prior existed
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **fields,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        }


# ----------------------------------------------------------------------------------------------------------------------
# The KV cache
# ----------------------------------------------------------------------------------------------------------------------


class KVCache:
    """All of the model's decoding state, in static tensors that a CUDA graph of the decode step reads and writes:

    - ``keys[l]``, ``values[l]`` (max_batch, max_len, kv_heads, head_dim): layer l's keys and values (flash-attn's
      cache layout), zeroed at allocation;
    - ``ids`` (max_batch, max_len) int64, with a copy prior (None without): the ids so far, which the copy embedding
      of each decoded position looks up;
    - ``visible`` (1, max_len) bool: the positions the current decode step attends to, ``arange(max_len) <= pos``;
    - ``prompts``: (rows, length) that prefilled prompts fill, rows grown by ``expand``; None before a prefill.

    A plain object, not a module: it never enters state dicts, ``.to()`` or data-parallel broadcasts.
    ``WorldModelTransformer.setup_cache`` makes one (``model.kv_cache``) and ``free_cache`` drops it.
    """

    def __init__(self, config: WorldModelConfig, max_batch: int, max_len: int, dtype: torch.dtype, device):
        self.max_batch, self.max_len = max_batch, max_len
        shape = (max_batch, max_len, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.dtype, self.device = dtype, self.keys[0].device  # "cuda" resolved to the device index it means
        self.copy_prior_offset = config.copy_prior_offset
        self.ids = None
        if self.copy_prior_offset:
            self.ids = torch.zeros((max_batch, max_len), dtype=torch.int64, device=device)
        self.positions = torch.arange(max_len, device=device)
        self.visible = torch.zeros((1, max_len), dtype=torch.bool, device=device)
        self.prompts: tuple[int, int] | None = None

    def start(self, ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor | None:
        """Take the new tokens ids (B, T) before they run: a prompt at positions [0, T) of rows [0, B) when ``pos`` is
        None, else one token per row (T == 1) at position ``pos`` ((1,) int64). Returns their copy prior's ids (B, T),
        or None without a copy prior. Static shapes and no host sync for a decode step."""
        if pos is None:
            self.prompts = tuple(ids.shape)
            if self.ids is None:
                return None
            self.ids[: ids.shape[0], : ids.shape[1]] = ids
            return sequence_copy_ids(ids, self.copy_prior_offset)
        torch.le(self.positions, pos, out=self.visible[0])
        if self.ids is None:
            return None
        return decode_copy_ids(self.ids, ids[:, 0], pos, self.copy_prior_offset)

    def attend(self, layer: int, q, k, v, backend: str, pos: torch.Tensor | None) -> torch.Tensor:
        """Attention of the new tokens through layer ``layer``'s cache: q (B, T, H, D), k and v (B, T, Hkv, D) ->
        (B, T, H, D). A prompt (``pos`` None): k and v are written at positions [0, T) of rows [0, B), and the prompt
        attends causally to itself. A decode step: one token per row at ``pos``, written there, attends to the cached
        positions [0, pos] of its row (``visible``, set by ``start``)."""
        batch, length = q.shape[:2]
        keys, values = self.keys[layer], self.values[layer]
        if pos is None:
            keys[:batch, :length] = k
            values[:batch, :length] = v
            return causal_attention(q, k, v, backend)
        return cached_attention(q, k, v, keys[:batch], values[:batch], pos, self.visible, backend)

    @torch.no_grad()
    def expand(self, group_size: int) -> None:
        """Give each prefilled prompt b the G = ``group_size`` rows b*G .. b*G+G-1 (the group-by-group order of
        ``ops.group_advantages``), copying its cached keys, values and ids instead of prefilling G times."""
        if self.prompts is None:
            raise ValueError("expand_cache needs prefilled prompts: call model.prefill(prompts) first")
        checks.integer("group_size", group_size)
        batch, length = self.prompts
        if batch * group_size > self.max_batch:
            raise ValueError(f"group_size {group_size} x {batch} prompts exceeds the cache's max_batch "
                             f"{self.max_batch}")
        for cache in self.keys + self.values + ([self.ids] if self.ids is not None else []):
            # the B prompts are copied out first (rows [0, B) are among the destinations): a temporary 1/G
            # the size of what is written, one layer's keys or values (or the ids) at a time
            prompts = cache[:batch, :length].clone()
            groups = cache[: batch * group_size].unflatten(0, (batch, group_size))
            groups[:, :, :length] = prompts[:, None]
        self.prompts = (batch * group_size, length)


# ----------------------------------------------------------------------------------------------------------------------
# Modules (attribute names are Hugging Face's, so that state dicts match)
# ----------------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in fp32, scale in the input dtype: Hugging Face's order, so half-precision results match too
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with rotary embeddings; layer ``layer_idx`` of the
    ``KVCache`` when one is given (Hugging Face's ``layer_idx``: not a parameter, state dicts do not see it)."""

    def __init__(self, config: WorldModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, backend, cache: KVCache | None = None, pos: torch.Tensor | None = None):
        """x (B, T, hidden) -> (B, T, hidden). Without ``cache``: whole sequences. With it, see ``KVCache.attend``."""
        batch, length, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(batch, length, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if cache is None:
            out = causal_attention(q, k, v, backend)
        else:
            out = cache.attend(self.layer_idx, q, k, v, backend, pos)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: WorldModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, backend, cache: KVCache | None = None, pos: torch.Tensor | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding (and the copy prior's), decoder layers, final norm: Hugging Face's ``LlamaModel`` (``model.``)."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.copy_prior_offset:
            self.copy_embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, ids, positions, config, backend, copy_ids=None, cache=None, pos=None):
        """ids (B, T) at ``positions`` (T,) -> final-norm hidden states (B, T, hidden). ``copy_ids`` (B, T), with a
        copy prior: the id each position's copy embedding looks up, -1 where there is none. ``cache``, ``pos``: see
        ``KVCache.attend``."""
        x = self.embed_tokens(ids)
        if copy_ids is not None:
            present = (copy_ids >= 0).unsqueeze(-1).to(x.dtype)
            x = x + self.copy_embed(copy_ids.clamp(min=0)) * present
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, backend, cache, pos)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


class WorldModelTransformer(nn.Module):
    """LLaMA causal LM over world-model tokens; see the module docstring for the calls."""

    def __init__(self, config: WorldModelConfig | None = None, attention_backend: str = "auto"):
        super().__init__()
        self.config = config if config is not None else WorldModelConfig()
        if not isinstance(self.config, WorldModelConfig):
            raise ValueError(f"config must be a WorldModelConfig, got {type(config).__name__}")
        checks.choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        self.attention_backend = attention_backend
        self.model = Decoder(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        self.kv_cache: KVCache | None = None  # setup_cache allocates it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Hugging Face's LLaMA initialization: N(0, initializer_range) weights, unit norm scales."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameter count; ``exclude_embedding`` leaves out the input embedding (a lookup, no matmul flops) but
        keeps the output layer, which is what 6 * params * tokens counts."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.model.embed_tokens.weight.numel() if exclude_embedding else total

    def _attention_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype attention runs in: the autocast dtype under autocast, else the parameters'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.lm_head.weight.dtype

    def _check_ids(self, name: str, ids) -> None:
        checks.tensor(name, ids, dims=(2,), dtypes=checks.INDEX_DTYPES)
        if ids.shape[1] < 1 or ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{name} must have 1 to max_position_embeddings ({self.config.max_position_embeddings}) "
                             f"tokens per row, got shape {tuple(ids.shape)}")
        checks.same_device(**{name: ids, "model": self.lm_head.weight})
        checks.token_ids(name, ids, self.config.vocab_size)

    # ---- whole sequences ---------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, return_hidden: bool = False, return_logits: bool = True):
        """ids (B, T) int64/int32 -> logits (B, T, V); (logits, hidden) with ``return_hidden``; hidden (B, T, H)
        alone with ``return_logits=False`` (the trainer's path: no (B, T, V) tensor). Ids are checked against the
        vocabulary, a host sync on a GPU, unless ``rlvrw.ops.set_value_checks(False)``."""
        self._check_ids("ids", ids)
        backend = resolve_attention_backend(self.attention_backend, ids.device, self._attention_dtype(ids.device),
                                            self.config.head_dim)
        hidden = self._hidden(ids, backend)
        if not return_logits:
            return hidden
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def _hidden(self, ids: torch.Tensor, backend: str, cache: KVCache | None = None, pos: torch.Tensor | None = None):
        """The one forward path of ``forward``, ``prefill`` and ``decode_step``: ids (B, T) -> final hidden states
        (B, T, H). Without ``cache``, whole sequences from position 0; with it, a prompt at positions [0, T) (``pos``
        None) or one token per row at ``pos``, whose keys, values and ids go into the cache."""
        positions = torch.arange(ids.shape[1], device=ids.device) if pos is None else pos
        if cache is not None:
            copy_ids = cache.start(ids, pos)
        elif self.config.copy_prior_offset:
            copy_ids = sequence_copy_ids(ids, self.config.copy_prior_offset)
        else:
            copy_ids = None
        return self.model(ids, positions, self.config, backend, copy_ids, cache, pos)

    # ---- KV cache and decoding ---------------------------------------------------------------------------------------
    def setup_cache(self, max_batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate ``model.kv_cache``, a ``KVCache``: per layer, keys and values (max_batch, max_len, kv_heads,
        head_dim), zeroed.

        ``dtype`` (default: the parameters') must be the dtype attention runs in: the parameters' dtype, or the
        autocast dtype when sampling under autocast. Reallocates if called again; ``free_cache`` releases it.
        """
        for name, value in (("max_batch", max_batch), ("max_len", max_len)):
            checks.integer(name, value)
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len must be <= max_position_embeddings ({self.config.max_position_embeddings}), "
                             f"got {max_len}")
        weight = self.lm_head.weight
        dtype = weight.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = weight.device if device is None else torch.device(device)
        self.free_cache()  # before allocating: the old cache's memory can then be reused
        self.kv_cache = KVCache(self.config, max_batch, max_len, dtype, device)

    def free_cache(self) -> None:
        self.kv_cache = None

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise ValueError("no KV cache: call model.setup_cache(max_batch, max_len) first")
        return self.kv_cache

    @torch.no_grad()
    def prefill(self, prompts: torch.Tensor, return_hidden: bool = False):
        """Run prompts (B, P) through the model, caching their keys and values in slots [0, B), positions [0, P).

        Returns the logits (B, V) at the last prompt position (the distribution of the first response token); with
        ``return_hidden`` also the hidden states (B, P, H).
        """
        cache = self._cache()
        self._check_ids("prompts", prompts)
        batch, length = prompts.shape
        if batch > cache.max_batch or length > cache.max_len:
            raise ValueError(f"prompts of shape {tuple(prompts.shape)} do not fit the cache (max_batch, max_len) = "
                             f"{(cache.max_batch, cache.max_len)}")
        backend = self._check_cache_backend(prompts.device)
        hidden = self._hidden(prompts, backend, cache)
        logits = self.lm_head(hidden[:, -1])
        return (logits, hidden) if return_hidden else logits

    @torch.no_grad()
    def expand_cache(self, group_size: int) -> None:
        """Give each prefilled prompt b the G = ``group_size`` slots b*G .. b*G+G-1 (the group-by-group order of
        ``ops.group_advantages``), copying its cached prompt keys and values instead of prefilling G times
        (``KVCache.expand``)."""
        self._cache().expand(group_size)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed one token per row and return the next-token logits (n, V).

        tokens (n,) int64: the token at position ``pos`` of rows [0, n) of the cache; pos: a 0-d or (1,) int64
        tensor on the model's device, the same for every row (the sequences of a layout all have the same length).
        Writes that position's keys and values into the cache. Shapes are static and there is no check of values
        (no host sync), so the call can be captured in a CUDA graph; ``pos`` must be below the cache's max_len.
        """
        cache = self._cache()
        checks.tensor("tokens", tokens, dims=(1,), dtypes=(torch.int64,))
        checks.tensor("pos", pos, dims=(0, 1), dtypes=(torch.int64,))
        if pos.numel() != 1:
            raise ValueError(f"pos must hold one position, got shape {tuple(pos.shape)}")
        if tokens.shape[0] > cache.max_batch:
            raise ValueError(f"tokens has {tokens.shape[0]} rows, more than the cache's max_batch {cache.max_batch}")
        checks.same_device(tokens=tokens, pos=pos, cache=cache)
        backend = self._check_cache_backend(tokens.device)
        if backend == "xformers":  # one query per row against a masked cache: not what xformers' kernels are for
            backend = "sdpa"
        hidden = self._hidden(tokens[:, None], backend, cache, pos.reshape(1))
        return self.lm_head(hidden[:, 0])

    def _check_cache_backend(self, device: torch.device) -> str:
        """The attention backend for cached calls, after checking that the cache can hold this model's keys."""
        cache = self._cache()
        compute = self._attention_dtype(device)
        if cache.dtype != compute:
            raise ValueError(f"the KV cache holds {cache.dtype} but attention runs in {compute}: "
                             "call setup_cache(..., dtype=that dtype)")
        if cache.device != device:
            raise ValueError(f"the KV cache is on {cache.device} but the inputs are on {device}")
        return resolve_attention_backend(self.attention_backend, device, compute, self.config.head_dim)

    # ---- Hugging Face checkpoints ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device=None, attention_backend: str = "auto"):
        """Load a Hugging Face LlamaForCausalLM directory: ``config.json`` and ``model.safetensors`` (or sharded
        safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin``). Every parameter must be there
        with its shape; the rotary ``inv_freq`` buffers older checkpoints carry are recomputed, not read."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"path must be a directory holding config.json, got {str(path)!r}")
        config = WorldModelConfig.from_hf_dict(json.loads(config_file.read_text()))
        state = {k: v for k, v in read_hf_weights(path).items() if not k.endswith("rotary_emb.inv_freq")}
        model = cls(config, attention_backend=attention_backend)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{tuple(expected[name].shape)}")
        model.load_state_dict(state)
        return model.to(dtype=dtype, device=device)

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` as a Hugging Face LlamaForCausalLM directory."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
