"""The world model's optional learned copy prior (``WorldModelConfig.copy_prior_offset``): which id each position
looks up, the KV-cache path equal to the full forward, checkpoints both ways, and plain Llama checkpoints unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from rlvrw.data.sequences import SequenceLayout
from rlvrw.models import WorldModelConfig, WorldModelTransformer

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_model(offset: int, dtype=torch.float64, seed: int = 0) -> WorldModelTransformer:
    torch.manual_seed(seed)
    return WorldModelTransformer(WorldModelConfig(**TINY, copy_prior_offset=offset)).to(dtype)


def test_each_position_sees_the_id_offset_minus_one_back():
    """The input at position q adds copy_embed(ids[q + 1 - offset]): checked against the plain model's forward
    with that embedding added by hand (the plain model has the same weights minus the copy embedding)."""
    offset = 5
    model = copy_model(offset)
    plain = WorldModelTransformer(WorldModelConfig(**TINY)).double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "copy_embed" not in k})
    ids = random_ids(2, 20)
    extra = torch.zeros(2, 20, TINY["hidden_size"], dtype=torch.float64)
    for q in range(offset - 1, 20):
        extra[:, q] = model.model.copy_embed.weight[ids[:, q + 1 - offset]]
    handle = plain.model.embed_tokens.register_forward_hook(lambda module, args, out: out + extra)
    try:
        want = plain(ids)
    finally:
        handle.remove()
    torch.testing.assert_close(model(ids), want, atol=1e-12, rtol=0)
    assert not torch.allclose(plain(ids), want)  # the copy embedding changed something


def test_still_causal():
    model = copy_model(4)
    ids = random_ids(1, 16)
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % TINY["vocab_size"]
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("offset", [2, 7, 25])  # 25: early decoded positions have no source yet
def test_prefill_expand_and_decode_equal_full_forward(offset):
    model = copy_model(offset)
    group, prompt_len, length = 2, 18, 30
    prompts = random_ids(2, prompt_len)
    continuation = random_ids(2 * group, length - prompt_len, seed=5)
    full = model(torch.cat([prompts.repeat_interleave(group, 0), continuation], 1))
    model.setup_cache(max_batch=2 * group, max_len=length)
    last = model.prefill(prompts)
    torch.testing.assert_close(last, full[::group, prompt_len - 1], atol=1e-12, rtol=0)
    model.expand_cache(group)
    for t in range(length - prompt_len):
        logits = model.decode_step(continuation[:, t], torch.tensor(prompt_len + t))
        torch.testing.assert_close(logits, full[:, prompt_len + t], atol=1e-12, rtol=0)
    model.free_cache()
    assert model.kv_cache is None


def test_checkpoint_round_trip(tmp_path):
    model = copy_model(7, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["copy_prior_offset"] == 7
    reloaded = WorldModelTransformer.from_pretrained(tmp_path)
    assert reloaded.config == model.config
    ids = random_ids(2, 20)
    torch.testing.assert_close(reloaded(ids), model(ids), atol=0, rtol=0)


def test_plain_llama_checkpoints_have_no_copy_prior(tmp_path):
    model = WorldModelTransformer(WorldModelConfig(**TINY))
    assert not hasattr(model.model, "copy_embed")
    model.save_pretrained(tmp_path)
    assert "copy_prior_offset" not in json.loads((tmp_path / "config.json").read_text())
    assert WorldModelTransformer.from_pretrained(tmp_path).config.copy_prior_offset == 0
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=False)).save_pretrained(hf_dir)
    loaded = WorldModelTransformer.from_pretrained(hf_dir)
    assert loaded.config.copy_prior_offset == 0 and not hasattr(loaded.model, "copy_embed")


def test_layout_copy_offset_points_at_the_previous_frame():
    """Position p of a predicted frame token minus ``copy_offset`` is the same token of the frame before it."""
    single = SequenceLayout.single_step(frame_tokens=6, context_frames=2, action_dims=2, action_bins=4,
                                        codebook_size=50)
    multi = SequenceLayout.multi_step(context_tokens=9, frame_tokens=4, context_frames=1, predicted_frames=3,
                                      action_dims=2, action_bins=4, codebook_size=50)
    for layout in (single, multi):
        frames = torch.arange(layout.num_frames * layout.frame_tokens).view(1, layout.num_frames, -1) % 50
        actions = torch.zeros(1, layout.num_actions, layout.action_dims, dtype=torch.long)
        context = torch.zeros(1, 9, dtype=torch.long) if layout.multi else None
        ids = layout.build(frames, actions, context)[0]
        predicted = layout.tables().loss_mask.nonzero().flatten()
        for p in predicted.tolist():
            assert ids[p - layout.copy_offset] == (ids[p] - layout.frame_tokens) % 50


@pytest.mark.parametrize("offset", [-1, 1.5, True])
def test_bad_offset(offset):
    with pytest.raises(ValueError, match="copy_prior_offset"):
        WorldModelConfig(**TINY, copy_prior_offset=offset)
