"""WorldModelTransformer: Hugging Face LlamaForCausalLM checkpoints both ways (identical logits), the outputs
(logits, hidden, hidden-only through linear_token_logprobs), causality, attention against a naive float64 reference,
the KV cache (prefill + decode == full forward, expanding a prompt over a group == prefilling it G times), a rollout
driven by a sequence layout's tables, the attention backends on a GPU, and input errors. Backend choice and autocast:
test_attention.py.

GPU-only tests (flash-attn, xformers, CUDA graph capture of the decode step) are marked ``gpu``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import rlvrw.ops as ops
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models import WorldModelConfig, WorldModelTransformer
from rlvrw.models import attention as A
from rlvrw.models import transformer as T

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
TINY_GQA = dict(TINY, num_key_value_heads=2)


def tiny_model(dtype=torch.float32, **overrides) -> WorldModelTransformer:
    return WorldModelTransformer(WorldModelConfig(**{**TINY, **overrides})).to(dtype)


def random_ids(batch: int, length: int, vocab: int = TINY["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def naive_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(D) + causal mask) v in the (B, T, H, D) layout, key/value heads repeated for GQA."""
    heads = q.shape[2]
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    v = v.repeat_interleave(heads // v.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    length = q.shape[1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


# ---- Hugging Face compatibility --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [TINY, TINY_GQA], ids=["mha", "gqa"])
def test_loads_hf_llama_checkpoint(tmp_path, sizes):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(**sizes, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model = WorldModelTransformer.from_pretrained(tmp_path)
    ids = random_ids(2, 24)
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)


def test_hf_loads_saved_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    model.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
    reloaded = WorldModelTransformer.from_pretrained(tmp_path)
    assert reloaded.config == model.config
    torch.testing.assert_close(reloaded(ids), model(ids), atol=0, rtol=0)


def test_loads_sharded_checkpoint_with_old_rope_buffers(tmp_path):
    """Sharded safetensors with an index, a transformers-4 config (rope_theta at top level), and the rotary
    inv_freq buffers that older checkpoints carry."""
    from safetensors.torch import save_file

    model = tiny_model(rope_theta=500.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {k: v for k, v in model.config.to_hf_dict().items() if k != "rope_parameters"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = WorldModelTransformer.from_pretrained(tmp_path)
    assert loaded.config.rope_theta == 500.0
    ids = random_ids(1, 16)
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_loads_pytorch_bin_checkpoint(tmp_path):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    loaded = WorldModelTransformer.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.lm_head.weight.dtype == torch.float64
    ids = random_ids(1, 16)
    torch.testing.assert_close(loaded(ids), model.double()(ids), atol=0, rtol=0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        WorldModelTransformer.from_pretrained(tmp_path)
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        WorldModelTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        WorldModelTransformer.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        WorldModelTransformer.from_pretrained(tmp_path)
    for key, value in [("tie_word_embeddings", True), ("hidden_act", "gelu"), ("attention_bias", True),
                       ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                       ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}), ("model_type", "gpt2")]:
        with pytest.raises(ValueError, match=key):
            WorldModelConfig.from_hf_dict({**config, key: value})


def test_reads_the_reference_config():
    """The keys of RLVR-World's multi-step transformer config (transformers 4.32 era, architectures LlamaModel)."""
    reference = {
        "architectures": ["LlamaModel"], "vocab_size": 9008, "bos_token_id": 9006, "eos_token_id": 9007,
        "hidden_act": "silu", "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_length": 8192, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 12,
        "num_hidden_layers": 12, "num_key_value_heads": 12, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "use_cache": True,
    }
    assert WorldModelConfig.from_hf_dict(reference) == WorldModelConfig(vocab_size=9008)


def test_default_config_is_the_papers():
    config = WorldModelConfig()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        12, 768, 12, 3072)
    assert (config.rms_norm_eps, config.vocab_size, config.rope_theta) == (1e-6, 4633, 10000.0)
    assert config.max_position_embeddings >= 1333 + 321 and config.num_key_value_heads == 12
    with torch.device("meta"):
        model = WorldModelTransformer()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert 119e6 < model.num_parameters() < 122e6
    assert model.num_parameters() - model.num_parameters(exclude_embedding=True) == 4633 * 768


# ---- outputs ---------------------------------------------------------------------------------------------------------


def test_outputs_hidden_and_logprobs_without_logits():
    model = tiny_model()
    ids = random_ids(2, 20)
    logits, hidden = model(ids, return_hidden=True)
    assert logits.shape == (2, 20, TINY["vocab_size"]) and hidden.shape == (2, 20, TINY["hidden_size"])
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight.t(), atol=1e-6, rtol=0)
    hidden_only = model(ids[:, :-1], return_logits=False)
    torch.testing.assert_close(hidden_only, hidden[:, :-1], atol=1e-6, rtol=0)
    logp = ops.linear_token_logprobs(hidden_only, model.lm_head.weight, ids[:, 1:])
    expected = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)
    logp.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal():
    model = tiny_model()
    ids = random_ids(2, 24)
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % TINY["vocab_size"]
    before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :15], before[:, :15], atol=0, rtol=0)
    assert not torch.allclose(after[:, 15:], before[:, 15:])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_matches_naive_attention_float64(kv_heads):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 17, 4, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 17, kv_heads, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    expected = naive_causal_attention(q, k, v)
    torch.testing.assert_close(T.causal_attention(q, k, v, "sdpa"), expected, atol=1e-12, rtol=0)
    # the cached path: the last query against a cache holding the first 17 positions of 24, rest garbage
    k_cache = torch.randn(2, 24, kv_heads, 8, dtype=torch.float64, generator=gen)
    v_cache = torch.randn(2, 24, kv_heads, 8, dtype=torch.float64, generator=gen)
    k_cache[:, :16], v_cache[:, :16] = k[:, :16], v[:, :16]
    pos = torch.tensor([16])
    visible = (torch.arange(24) <= pos)[None]
    out = T.cached_attention(q[:, 16:], k[:, 16:], v[:, 16:], k_cache, v_cache, pos, visible, "sdpa")
    torch.testing.assert_close(out, expected[:, 16:], atol=1e-12, rtol=0)
    torch.testing.assert_close(k_cache[:, :17], k)


def test_rotary_matches_complex_rotation():
    """apply_rotary rotates each (x_i, x_{i+D/2}) pair by position * theta^(-2i/D)."""
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    positions = torch.arange(5)
    cos, sin = T.rotary_cos_sin(positions, 8, 10000.0, torch.float64)
    pairs = torch.complex(x[..., :4], x[..., 4:])
    angles = positions[:, None].double() * 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    expected = torch.cat([rotated.real, rotated.imag], -1)
    torch.testing.assert_close(T.apply_rotary(x, cos, sin), expected, atol=1e-6, rtol=0)  # fp32 angles


# ---- KV cache --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("sizes", [TINY, TINY_GQA], ids=["mha", "gqa"])
def test_prefill_and_decode_equal_full_forward(dtype, atol, sizes):
    model = WorldModelTransformer(WorldModelConfig(**sizes)).to(dtype)
    ids = random_ids(3, 30)
    prompt_len = 18
    full, hidden = model(ids, return_hidden=True)
    model.setup_cache(max_batch=4, max_len=40)
    last, prompt_hidden = model.prefill(ids[:, :prompt_len], return_hidden=True)
    torch.testing.assert_close(last, full[:, prompt_len - 1], atol=atol, rtol=0)
    torch.testing.assert_close(prompt_hidden, hidden[:, :prompt_len], atol=atol, rtol=0)
    for pos in range(prompt_len, 30):
        logits = model.decode_step(ids[:, pos], torch.tensor(pos))
        torch.testing.assert_close(logits, full[:, pos], atol=atol, rtol=0)


def test_expand_cache_equals_prefilling_each_sample():
    model = tiny_model()
    group, prompt_len = 3, 12
    prompts = random_ids(2, prompt_len)
    continuation = random_ids(2 * group, 6, seed=7)  # different tokens for every sample of a group
    model.setup_cache(max_batch=2 * group, max_len=prompt_len + 6)
    model.prefill(prompts)
    model.expand_cache(group)
    expanded = [model.decode_step(continuation[:, t], torch.tensor(prompt_len + t)) for t in range(6)]
    model.setup_cache(max_batch=2 * group, max_len=prompt_len + 6)
    model.prefill(prompts.repeat_interleave(group, 0))
    separate = [model.decode_step(continuation[:, t], torch.tensor(prompt_len + t)) for t in range(6)]
    torch.testing.assert_close(torch.stack(expanded), torch.stack(separate), atol=0, rtol=0)
    full = model(torch.cat([prompts.repeat_interleave(group, 0), continuation], 1))
    torch.testing.assert_close(torch.stack(expanded, 1), full[:, prompt_len:], atol=1e-5, rtol=0)
    model.free_cache()
    assert model.kv_cache is None


def test_kv_cache_holds_all_decoding_state():
    """setup_cache makes one KVCache (keys and values per layer, the decode mask, the prompt extent); the modules
    hold no tensor besides their parameters, so nothing of the cache leaks into state dicts."""
    model = tiny_model(**TINY_GQA)
    keys_before = set(model.state_dict())
    model.setup_cache(max_batch=6, max_len=20)
    cache = model.kv_cache
    assert isinstance(cache, T.KVCache) and cache.ids is None and cache.prompts is None
    assert len(cache.keys) == len(cache.values) == TINY["num_hidden_layers"]
    assert all(t.shape == (6, 20, 2, 8) for t in cache.keys + cache.values)
    model.prefill(random_ids(2, 9))
    assert cache.prompts == (2, 9)
    model.expand_cache(3)
    assert cache.prompts == (6, 9)
    model.decode_step(random_ids(6, 1)[:, 0], torch.tensor(9))
    assert torch.equal(cache.visible[0], torch.arange(20) <= 9)
    assert set(model.state_dict()) == keys_before
    for module in model.modules():
        assert not [name for name, value in vars(module).items() if isinstance(value, torch.Tensor)], module


def test_rollout_driven_by_layout_tables():
    """How the rollout uses the pieces: prefill the prompts, expand over the group, then at every response position
    sample from the legal range where the layout says a frame token goes and copy the known token elsewhere. The
    sampled responses lie in their legal ranges and their log-probs recomputed by a full forward equal the decode's."""
    layout = SequenceLayout.multi_step(context_tokens=6, frame_tokens=4, context_frames=1, predicted_frames=2,
                                       action_dims=2, action_bins=3, codebook_size=7)
    model = tiny_model(vocab_size=layout.vocab_size)
    gen = torch.Generator().manual_seed(5)
    frames = torch.randint(0, 7, (2, layout.num_frames, 4), generator=gen)
    actions = torch.randint(0, 3, (2, layout.num_actions, 2), generator=gen)
    context = torch.randint(0, 7, (2, 6), generator=gen)
    prompt, known = layout.split(layout.build(frames, actions, context))
    group = 3
    known = known.repeat_interleave(group, 0)
    table = layout.response_tables()
    vocab_ids = torch.arange(layout.vocab_size)
    model.setup_cache(max_batch=2 * group, max_len=layout.seq_len)
    logits = model.prefill(prompt).repeat_interleave(group, 0)
    model.expand_cache(group)
    response, sampled_logp = [], []
    for j in range(layout.response_len):
        legal = (vocab_ids >= table.low[j]) & (vocab_ids < table.high[j])
        logp = logits.masked_fill(~legal, float("-inf")).log_softmax(-1)
        sample = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
        token = torch.where(table.loss_mask[j], sample, known[:, j])
        response.append(token)
        sampled_logp.append(logp.gather(-1, token[:, None])[:, 0])
        logits = model.decode_step(token, torch.tensor(layout.prompt_len + j))
    response = torch.stack(response, 1)
    assert bool(((response >= table.low) & (response < table.high)).all())
    assert torch.equal(response[:, ~table.loss_mask], known[:, ~table.loss_mask])
    ids = torch.cat([prompt.repeat_interleave(group, 0), response], 1)
    _, _, mask = layout.next_token_targets(ids)
    full = model(ids[:, :-1])[:, layout.prompt_len - 1 :]
    legal = (vocab_ids >= table.low[:, None]) & (vocab_ids < table.high[:, None])
    recomputed = full.masked_fill(~legal, float("-inf")).log_softmax(-1).gather(-1, response[..., None])[..., 0]
    scored = mask[:, layout.prompt_len - 1 :]
    torch.testing.assert_close(recomputed[scored], torch.stack(sampled_logp, 1)[scored], atol=1e-5, rtol=0)


def test_cache_errors():
    model = tiny_model()
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="setup_cache"):
        model.prefill(ids)
    with pytest.raises(ValueError, match="max_len must be <="):
        model.setup_cache(2, 65)
    with pytest.raises(ValueError, match="max_batch"):
        model.setup_cache(0, 16)
    model.setup_cache(2, 16)
    with pytest.raises(ValueError, match="call model.prefill"):
        model.expand_cache(2)
    with pytest.raises(ValueError, match="do not fit the cache"):
        model.prefill(random_ids(2, 17))
    model.prefill(ids)
    with pytest.raises(ValueError, match="exceeds the cache's max_batch"):
        model.expand_cache(2)
    with pytest.raises(ValueError, match="group_size"):
        model.expand_cache(0)
    with pytest.raises(ValueError, match="pos must have dtype"):
        model.decode_step(ids[:, 0], torch.tensor(10.0))
    with pytest.raises(ValueError, match="pos must hold one position"):
        model.decode_step(ids[:, 0], torch.tensor([10, 11]))
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        model.decode_step(ids, torch.tensor(10))
    with pytest.raises(ValueError, match="more than the cache's max_batch"):
        model.decode_step(random_ids(3, 1)[:, 0], torch.tensor(10))
    model.setup_cache(2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="KV cache holds torch.float64"):
        model.prefill(ids)


# ---- backends --------------------------------------------------------------------------------------------------------


def _require(backend: str):
    """Skip, saying why, when ``backend`` cannot run here (the package or its functions are missing)."""
    if backend == "flash" and A._flash_attn().unavailable:
        pytest.skip(A._flash_attn().unavailable)
    if backend == "xformers" and A._xformers_ops().unavailable:
        pytest.skip(A._xformers_ops().unavailable)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "xformers"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_backends_match_sdpa_on_gpu(backend, kv_heads):
    _require(backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(2, 300, kv_heads, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    expected = naive_causal_attention(q.double(), k.double(), v.double())
    sdpa_error = (T.causal_attention(q, k, v, "sdpa").double() - expected).abs().max()
    error = (T.causal_attention(q, k, v, backend).double() - expected).abs().max()
    assert error <= 2 * sdpa_error + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "xformers", "sdpa"])
def test_backends_decode_equal_full_forward_on_gpu(backend):
    _require(backend)
    torch.manual_seed(0)
    model = WorldModelTransformer(WorldModelConfig(**{**TINY, "hidden_size": 256, "num_attention_heads": 4}),
                                  attention_backend=backend).cuda().bfloat16()
    reference = WorldModelTransformer(model.config, attention_backend="sdpa").cuda().double()
    reference.load_state_dict(model.state_dict())
    ids = random_ids(4, 40).cuda()
    expected = reference(ids).float()
    atol = 2e-2  # bf16 activations; logits have std ~0.3 at this init
    torch.testing.assert_close(model(ids).float(), expected, atol=atol, rtol=0)
    model.setup_cache(4, 48)
    torch.testing.assert_close(model.prefill(ids[:, :30]).float(), expected[:, 29], atol=atol, rtol=0)
    for pos in range(30, 40):
        logits = model.decode_step(ids[:, pos], torch.tensor(pos, device="cuda"))
        torch.testing.assert_close(logits.float(), expected[:, pos], atol=atol, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_decode_step_captured_in_cuda_graph(backend):
    torch.manual_seed(0)
    model = WorldModelTransformer(WorldModelConfig(**TINY), attention_backend=backend).cuda().bfloat16()
    ids = random_ids(4, 40).cuda()
    model.setup_cache(8, 48)
    model.prefill(ids[:2, :30])
    model.expand_cache(2)  # rows 0,1 <- prompt 0 and rows 2,3 <- prompt 1
    rows = ids[:2, 30:].repeat_interleave(2, 0)
    token = rows[:, 0].clone()
    pos = torch.tensor(30, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        model.decode_step(token, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.decode_step(token, pos)
    replayed = []
    for t in range(10):
        token.copy_(rows[:, t])
        pos.fill_(30 + t)
        graph.replay()
        replayed.append(logits.clone())
    replayed = torch.stack(replayed, 1).float()
    model.prefill(ids[:2, :30])
    model.expand_cache(2)
    eager = [model.decode_step(rows[:, t], torch.tensor(30 + t, device="cuda")) for t in range(10)]
    torch.testing.assert_close(replayed, torch.stack(eager, 1).float(), atol=1e-3, rtol=0)
    full = model(torch.cat([ids[:2, :30].repeat_interleave(2, 0), rows], 1))[:, 30:]
    torch.testing.assert_close(replayed, full.float(), atol=2e-2, rtol=0)


# ---- input errors ----------------------------------------------------------------------------------------------------


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="ids must have dtype"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="ids must be 2-D"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        model(torch.full((1, 4), TINY["vocab_size"]))
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        WorldModelTransformer(WorldModelConfig(**TINY), attention_backend="fast")
    with pytest.raises(ValueError, match="config must be a WorldModelConfig"):
        WorldModelTransformer(dict(TINY))
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        WorldModelConfig(**{**TINY, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        WorldModelConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        WorldModelConfig(**{**TINY, "vocab_size": 0})
    with pytest.raises(ValueError, match="head_dim must be even"):
        WorldModelConfig(**{**TINY, "head_dim": 7})
