"""The group sampler (rlvrw.train.rollout) on a tiny world model:

* one prefill per prompt, shared by its group (prefill calls and rows counted);
* sampled tokens lie in the legal range of their position; copied positions (EOS, the injected true actions of a
  multi-step layout) hold the known tokens;
* the shared-cache rollout equals G independent rollouts (each prompt prefilled G times) with the same noise, and
  any chunking or split over callers (``first_row``) draws the same responses;
* the sampling log-probs equal the trainer's recomputation by a full forward (restricted to the legal ids, tempered);
* Gumbel-max draws follow the restricted softmax (and its top-k truncation); the noise is a function of its counters;
* input errors; on a GPU, the CUDA-graph rollout: replays reproduce it, legal ranges, log-probs, the eager loop.
"""

from __future__ import annotations

import pytest
import torch

from rlvrw.data.sequences import SequenceLayout
from rlvrw.models import WorldModelConfig, WorldModelTransformer
from rlvrw.train import rollout as R
from rlvrw.train.build import value_checks_off_on_gpu
from rlvrw.train.trainer import SampledTokenLogprobs

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
MULTI = SequenceLayout.multi_step(context_tokens=6, frame_tokens=4, context_frames=1, predicted_frames=2,
                                  action_dims=2, action_bins=3, codebook_size=7)
SINGLE = SequenceLayout.single_step(frame_tokens=4, context_frames=2, action_dims=2, action_bins=3, codebook_size=7)


def tiny_model(layout: SequenceLayout, device="cpu", seed: int = 0) -> WorldModelTransformer:
    torch.manual_seed(seed)
    model = WorldModelTransformer(WorldModelConfig(vocab_size=layout.vocab_size, **TINY))
    with torch.no_grad():  # sharper than the default init, so that draws differ visibly between tokens
        model.lm_head.weight.mul_(20)
    return model.to(device)


def clips(layout: SequenceLayout, batch: int, seed: int = 1, device="cpu"):
    """(prompts (B, P), known responses (B, R)) of random true sequences."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, layout.codebook_size, (batch, layout.num_frames, layout.frame_tokens), generator=gen)
    actions = torch.randint(0, layout.action_bins, (batch, layout.num_actions, layout.action_dims), generator=gen)
    context = torch.randint(0, layout.codebook_size, (batch, layout.context_tokens), generator=gen) \
        if layout.multi else None
    prompts, known = layout.split(layout.build(frames, actions, context).to(device))
    return prompts.contiguous(), known.contiguous()


def test_one_prefill_per_prompt(monkeypatch):
    model = tiny_model(MULTI)
    prefilled, decoded = [], []
    prefill, decode_step = model.prefill, model.decode_step
    monkeypatch.setattr(model, "prefill", lambda prompts: prefilled.append(prompts.shape[0]) or prefill(prompts))
    monkeypatch.setattr(model, "decode_step",
                        lambda tokens, pos: decoded.append(tokens.shape[0]) or decode_step(tokens, pos))
    sampler = R.GroupSampler(model, MULTI, group_size=4, max_prompts=2)
    prompts, known = clips(MULTI, 3)
    rollout = sampler.sample(prompts, known, seed=7)
    assert prefilled == [2, 1]  # every prompt once, in chunks of max_prompts; never G times
    assert decoded == [8] * (MULTI.response_len - 1) + [4] * (MULTI.response_len - 1)
    assert rollout.ids.shape == (12, MULTI.seq_len) and rollout.logp.shape == rollout.mask.shape == (12, 12)
    assert torch.equal(rollout.ids[:, : MULTI.prompt_len], prompts.repeat_interleave(4, 0))


@pytest.mark.parametrize("layout", [SINGLE, MULTI], ids=["single_step", "multi_step"])
def test_legal_ranges_and_copied_tokens(layout):
    sampler = R.GroupSampler(tiny_model(layout), layout, group_size=5, max_prompts=2)
    prompts, known = clips(layout, 2)
    rollout = sampler.sample(prompts, known, seed=3)
    table = layout.response_tables()
    response = rollout.ids[:, layout.prompt_len :]
    assert bool(((response >= table.low) & (response < table.high)).all())
    copied = ~table.loss_mask
    assert torch.equal(response[:, copied], known.repeat_interleave(5, 0)[:, copied])
    assert torch.equal(rollout.mask, table.loss_mask.expand_as(rollout.mask))
    assert bool((rollout.logp[:, copied] == 0).all()) and bool((rollout.logp[:, ~copied] < 0).all())
    # the frame tokens were drawn, not copied: ten samples of two prompts differ somewhere
    assert len({tuple(row) for row in response[:, ~copied].tolist()}) > 2


def test_shared_cache_equals_independent_rollouts_with_the_same_noise():
    model = tiny_model(MULTI)
    prompts, known = clips(MULTI, 3)
    shared = R.GroupSampler(model, MULTI, group_size=4, max_prompts=3).sample(prompts, known, seed=11)
    independent = R.GroupSampler(model, MULTI, group_size=1, max_prompts=12).sample(
        prompts.repeat_interleave(4, 0), known.repeat_interleave(4, 0), seed=11)
    assert torch.equal(shared.ids, independent.ids)
    torch.testing.assert_close(shared.logp, independent.logp, atol=1e-6, rtol=0)
    # chunked, or split between two callers at a group boundary: the same rows draw the same tokens
    chunked = R.GroupSampler(model, MULTI, group_size=4, max_prompts=1).sample(prompts, known, seed=11)
    sampler = R.GroupSampler(model, MULTI, group_size=4, max_prompts=2)
    first = sampler.sample(prompts[:1], known[:1], seed=11)
    rest = sampler.sample(prompts[1:], known[1:], seed=11, first_row=4)
    for other in (chunked.ids, torch.cat([first.ids, rest.ids])):
        assert torch.equal(shared.ids, other)
    assert not torch.equal(shared.ids, sampler.sample(prompts, known, seed=12).ids)


@pytest.mark.parametrize("layout", [SINGLE, MULTI], ids=["single_step", "multi_step"])
def test_sampling_logprobs_equal_the_full_forward(layout):
    model = tiny_model(layout)
    prompts, known = clips(layout, 2)
    rollout = R.GroupSampler(model, layout, group_size=3, temperature=0.7).sample(prompts, known, seed=5)
    scorer = SampledTokenLogprobs(model, layout, temperature=0.7)
    with torch.no_grad():
        recomputed, _ = scorer(rollout.ids)
    torch.testing.assert_close(rollout.logp[:, scorer.response_positions], recomputed, atol=1e-5, rtol=0)


def test_top_k_draws_among_the_k_most_likely():
    model = tiny_model(SINGLE)
    prompts, known = clips(SINGLE, 2)
    rollout = R.GroupSampler(model, SINGLE, group_size=8, top_k=2).sample(prompts, known, seed=2)
    with torch.no_grad():
        logits = model(rollout.ids[:, :-1])[:, SINGLE.prompt_len - 1 :, : SINGLE.codebook_size]
    drawn = rollout.ids[:, SINGLE.prompt_len :][:, : SINGLE.frame_tokens]
    top2 = logits[:, : SINGLE.frame_tokens].topk(2, dim=-1).indices
    assert bool((top2 == drawn[..., None]).any(-1).all())
    assert bool((rollout.logp[:, : SINGLE.frame_tokens] > torch.log(torch.tensor(0.5)) - 1e-6).any())


@pytest.mark.parametrize("top_k", [0, 3])
def test_gumbel_max_follows_the_restricted_softmax(top_k):
    rows, vocab = 40_000, 8
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 3.0, 0.2]]).expand(rows, vocab)
    low, high, temperature = torch.tensor([1]), torch.tensor([6]), 1.5
    tokens, logp = R.sample_tokens(logits, low, high, temperature, top_k, torch.tensor([9]),
                                   torch.arange(rows), torch.tensor([4]))
    expected = (logits[0] / temperature).masked_fill((torch.arange(vocab) < 1) | (torch.arange(vocab) >= 6),
                                                     float("-inf"))
    if top_k:
        expected = expected.masked_fill(expected < expected.topk(top_k).values[-1], float("-inf"))
    probs = expected.softmax(-1)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0  # illegal (and truncated) ids are never drawn
    sigma = (probs * (1 - probs) / rows).sqrt()
    assert bool(((counts / rows - probs).abs() <= 5 * sigma + 1e-12).all()), (counts / rows, probs)
    torch.testing.assert_close(logp, probs.log()[tokens].float())


def test_noise_is_a_function_of_its_counters():
    seed, rows, position = torch.tensor([123]), torch.arange(64), torch.tensor([5])
    noise = R.gumbel_noise(seed, rows, position, 50)
    assert torch.equal(noise, R.gumbel_noise(seed, rows, position, 50))
    assert torch.equal(noise[10:20], R.gumbel_noise(seed, rows[10:20], position, 50))
    for other in (R.gumbel_noise(torch.tensor([124]), rows, position, 50),
                  R.gumbel_noise(seed, rows + 64, position, 50), R.gumbel_noise(seed, rows, position + 1, 50)):
        assert (other == noise).float().mean() < 0.01
    assert bool(torch.isfinite(noise).all())
    # Gumbel(0, 1): mean = Euler's gamma (0.5772), variance = pi^2 / 6
    assert abs(noise.mean().item() - 0.5772) < 0.03 and abs(noise.var().item() - 1.6449) < 0.08


def test_bad_inputs():
    model = tiny_model(SINGLE)
    prompts, known = clips(SINGLE, 2)
    for kwargs, match in [(dict(group_size=0), "group_size"), (dict(max_prompts=1.5), "max_prompts"),
                          (dict(temperature=0), "temperature"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=match):
            R.GroupSampler(model, SINGLE, **kwargs)
    with pytest.raises(ValueError, match="model must be a WorldModelTransformer"):
        R.GroupSampler(torch.nn.Linear(2, 2), SINGLE)
    with pytest.raises(ValueError, match="layout must be a SequenceLayout"):
        R.GroupSampler(model, "single_step")
    with pytest.raises(ValueError, match="vocab_size"):
        R.GroupSampler(model, MULTI)
    sampler = R.GroupSampler(model, SINGLE, group_size=2)
    with pytest.raises(ValueError, match="prompts must have shape"):
        sampler.sample(prompts[:, 1:], known, seed=0)
    with pytest.raises(ValueError, match="known must be a 2-D int64"):
        sampler.sample(prompts, known.int(), seed=0)
    with pytest.raises(ValueError, match="one row per prompt"):
        sampler.sample(prompts, known[:1], seed=0)
    with pytest.raises(ValueError, match="seed"):
        sampler.sample(prompts, known, seed=-1)
    with pytest.raises(ValueError, match="first_row"):
        sampler.sample(prompts, known, seed=0, first_row=-2)
    with pytest.raises(ValueError, match="at least one prompt"):
        sampler.sample(prompts[:0], known[:0], seed=0)


@pytest.mark.gpu
def test_cuda_graph_rollout():
    layout = MULTI
    model = tiny_model(layout, device="cuda").bfloat16()
    prompts, known = clips(layout, 3, device="cuda")
    graphed = R.GroupSampler(model, layout, group_size=4, max_prompts=2, cuda_graph=True)
    first = graphed.sample(prompts, known, seed=4)
    assert set(graphed.graphs) == {8, 4}  # one graph per row count (a full chunk, the last one)
    again = graphed.sample(prompts, known, seed=4)  # the graphs replayed after a new prefill
    assert torch.equal(first.ids, again.ids) and torch.equal(first.logp, again.logp)
    table = layout.response_tables("cuda")
    response = first.ids[:, layout.prompt_len :]
    assert bool(((response >= table.low) & (response < table.high)).all())
    scorer = SampledTokenLogprobs(model, layout)
    with torch.no_grad():
        recomputed, _ = scorer(first.ids)
    gap = (first.logp[:, scorer.response_positions.cuda()] - recomputed).abs().max().item()
    assert gap < 0.1, gap  # bf16 decode path vs bf16 full forward
    # the eager loop runs the same kernels; rounding may still flip a rare draw, and the row then diverges
    eager = R.GroupSampler(model, layout, group_size=4, max_prompts=2, cuda_graph=False).sample(prompts, known, seed=4)
    assert (first.ids == eager.ids).all(dim=1).float().mean() >= 0.75


@pytest.mark.gpu
def test_rollout_has_no_host_sync():
    model = tiny_model(SINGLE, device="cuda").bfloat16()
    prompts, known = clips(SINGLE, 2, device="cuda")
    sampler = R.GroupSampler(model, SINGLE, group_size=4)
    with value_checks_off_on_gpu(torch.device("cuda")):  # the prompts' range check would read them back
        sampler.sample(prompts, known, seed=0)  # first use: graph capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler.sample(prompts, known, seed=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
