"""GRPO post-training (rlvrw.train.trainer) with a tiny world model, a tiny frame tokenizer and random-weight LPIPS:

* an update lowers the GRPO loss of its (fixed) batch, and uneven micro-batches give the one-batch update;
* on a toy reward (frame tokens equal to 0) the reward rises over a few steps;
* a whole step: reward = -(L1 + LPIPS) with the logged parts adding up, the sampler's log-probs equal the trainer's,
  the reference is a frozen copy of the starting policy (none when the KL coefficient is 0);
* the frame decoder, the repetition rate, multi-step layouts;
* ``rlvrw rl`` runs: resuming equals an uninterrupted run, two gloo processes equal one process on the same global
  batch, checkpoints and logs; configuration and input errors;
* on a GPU: no host synchronization from the rollout to the optimizer step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rlvrw.ops as ops
from rlvrw.data import token_cache as TC
from rlvrw.data.sequences import LayoutTables, SequenceLayout
from rlvrw.models import LPIPS, CompressiveTokenizer, FrameTokenizer, WorldModelConfig, WorldModelTransformer
from rlvrw.models.tokenizer_files import save_tokenizer
from rlvrw.train import distributed
from rlvrw.train import pretrain as P
from rlvrw.train import trainer as T
from rlvrw.train.logging import read_metrics

CODEBOOK, FRAME_TOKENS, ACTION_DIMS, ACTION_BINS = 16, 16, 3, 8
LAYOUT = SequenceLayout.single_step(FRAME_TOKENS, context_frames=2, action_dims=ACTION_DIMS, action_bins=ACTION_BINS,
                                    codebook_size=CODEBOOK)
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_TOKENIZER = dict(channels=(8, 8, 8), layers_per_block=1, latent_channels=4, levels=(4, 4), num_groups=4)
RUN = dict(context_frames=2, action_bins=ACTION_BINS, steps=3, prompts_per_step=2, group_size=4, micro_batch_size=3,
           rollout_prompts=2, model_overrides=TINY_MODEL, lpips_weights="random", progress=False, tensorboard="off",
           save_every=100)
TIMES = ("time", "time_rollout_s", "time_decode_s", "time_reward_s", "time_update_s", "tokens_per_s", "step_time_s")


def tiny_tokenizer() -> FrameTokenizer:
    torch.manual_seed(0)
    return FrameTokenizer(**TINY_TOKENIZER).eval().requires_grad_(False)  # 16x16 frames <-> 4x4 ids


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A token cache (8 episodes of 8 frames) and a tokenizer checkpoint."""
    root = tmp_path_factory.mktemp("rl_files")
    rng = np.random.default_rng(0)
    TC.save_token_cache(root / "tokens.npz", rng.integers(0, CODEBOOK, (8, 8, FRAME_TOKENS)),
                       rng.integers(0, ACTION_BINS, (8, 8, ACTION_DIMS)), codebook_size=CODEBOOK)
    save_tokenizer(tiny_tokenizer(), root / "tokenizer.safetensors")
    return {"data": str(root / "tokens.npz"), "tokenizer": str(root / "tokenizer.safetensors")}


def run_config(files, out_dir, **overrides) -> T.RLConfig:
    return T.RLConfig(**{**RUN, **files, "out_dir": str(out_dir), **overrides})


def make_trainer(layout=LAYOUT, tokenizer=None, **overrides) -> T.GRPOTrainer:
    config = T.RLConfig(**{**RUN, **overrides})
    torch.manual_seed(config.seed)
    policy = WorldModelTransformer(WorldModelConfig(vocab_size=layout.vocab_size, max_position_embeddings=256,
                                                    **TINY_MODEL))
    lpips = LPIPS("vgg", random_weights=True)
    return T.GRPOTrainer(config, policy, layout, tokenizer or tiny_tokenizer(), lpips, distributed.setup("cpu"))


def true_sequences(batch: int, seed: int = 0, layout=LAYOUT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, layout.codebook_size, (batch, layout.num_frames, layout.frame_tokens), generator=gen)
    actions = torch.randint(0, layout.action_bins, (batch, layout.num_actions, layout.action_dims), generator=gen)
    context = torch.randint(0, layout.codebook_size, (batch, layout.context_tokens), generator=gen) \
        if layout.multi else None
    return layout.build(frames, actions, context)


def frame_rewards(trainer: T.GRPOTrainer, rollout, sequences) -> torch.Tensor:
    return ops.l1_lpips_reward(trainer.renderer(rollout.ids), trainer.renderer(sequences), trainer.config.group_size,
                               trainer.lpips)


def batch_loss(trainer: T.GRPOTrainer, rollout, advantages, old_logp) -> torch.Tensor:
    """The GRPO loss of a fixed batch under the current policy (no gradient)."""
    with torch.no_grad(), trainer.reference.loaded() as reference:
        logp, _ = trainer.scorer(rollout.ids)
        loss, _ = ops.grpo_loss(logp, old_logp, advantages, torch.ones_like(logp, dtype=torch.bool),
                                reference(rollout.ids), **trainer.loss_options)
    return loss


# ---- the update ------------------------------------------------------------------------------------------------------
def test_update_lowers_the_loss_of_its_batch():
    trainer = make_trainer(lr=1e-3, ref_dtype="fp32")
    sequences = true_sequences(2)
    rollout = trainer.sampler.sample(*LAYOUT.split(sequences), seed=1)
    advantages = ops.group_advantages(frame_rewards(trainer, rollout, sequences), 4)
    with torch.no_grad():
        old_logp, _ = trainer.scorer(rollout.ids)
    before = batch_loss(trainer, rollout, advantages, old_logp)
    sums = trainer.update(rollout, advantages)  # 8 rollouts in micro-batches of 3, 3 and 2
    torch.testing.assert_close(sums["loss"], before, atol=1e-6, rtol=1e-5)  # the global normalizer
    assert batch_loss(trainer, rollout, advantages, old_logp) < before - 1e-4
    assert float(sums["grad_norm"]) > 0 and float(sums["clip_frac"]) == 0.0  # on-policy: ratio 1


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_give_the_one_batch_update(loss_agg):
    sequences = true_sequences(2)
    results = []
    for micro_batch in (8, 3):
        trainer = make_trainer(micro_batch_size=micro_batch, ref_dtype="fp32", loss_agg=loss_agg)
        rollout = trainer.sampler.sample(*LAYOUT.split(sequences), seed=1)
        trainer.update(rollout, ops.group_advantages(frame_rewards(trainer, rollout, sequences), 4))
        results.append([p.detach().clone() for p in trainer.policy.parameters()])
    for one, many in zip(*results):
        torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


def test_reward_rises_on_a_toy_problem():
    """Reward: the share of predicted frame tokens that are 0 (1/16 at random)."""
    trainer = make_trainer(lr=1e-2, kl_coef=0.0, group_size=8)
    prompts, known = LAYOUT.split(true_sequences(2))
    means = []
    for step in range(12):
        rollout = trainer.sampler.sample(prompts, known, seed=step)
        rewards = (LAYOUT.response_frames(rollout.ids[:, LAYOUT.prompt_len :]) == 0).float().mean(dim=(1, 2))
        trainer.update(rollout, ops.group_advantages(rewards, 8))
        means.append(rewards.mean().item())
    assert np.mean(means[-3:]) > np.mean(means[:3]) + 0.4, means  # about 0.1 -> 0.75


# ---- a whole step ----------------------------------------------------------------------------------------------------
def test_train_step_metrics():
    trainer = make_trainer(ref_dtype="fp32", l1_weight=1.0, lpips_weight=2.0)
    initial = [p.detach().clone() for p in trainer.policy.parameters()]
    sums, timer = trainer.train_step(true_sequences(2), step=0)
    metrics = T.reduce_metrics(sums, timer)
    assert metrics["reward_mean"] == pytest.approx(-(metrics["reward_l1"] + 2 * metrics["reward_lpips"]), abs=1e-6)
    assert metrics["reward_l1"] > 0 and metrics["reward_lpips"] > 0 and metrics["reward_std"] > 0
    assert metrics["logp_gap"] < 1e-5  # the sampler and the trainer score the same distribution
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-9)  # the reference is the starting policy
    assert 0 < metrics["entropy"] <= np.log(CODEBOOK) + 1e-5 and metrics["grad_norm"] > 0
    assert set(T.PHASES) == {name[5:-2] for name in metrics if name.startswith("time_")}
    assert all(np.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(p, q) for p, q in zip(initial, trainer.policy.parameters()))
    for p, q in zip(initial, trainer.reference.scorer.world_model.parameters()):  # frozen
        assert torch.equal(p, q) and not q.requires_grad


def test_reference_model():
    trainer = make_trainer()  # defaults: bf16 reference, KL coefficient 1e-3
    reference = trainer.reference.scorer.world_model
    assert all(p.dtype == torch.bfloat16 for p in reference.parameters())
    assert make_trainer(kl_coef=0.0).reference is None
    assert not T.ReferencePolicy(trainer.policy, LAYOUT, 1.0, torch.bfloat16, torch.device("cpu"), True).offload
    sums, _ = make_trainer(kl_coef=0.0).train_step(true_sequences(2), step=0)
    assert float(sums["kl"]) == 0.0


def test_old_logp_from_the_rollout():
    trainer = make_trainer(old_logp="rollout", ref_dtype="fp32")
    sums, _ = trainer.train_step(true_sequences(2), step=0)
    metrics = T.reduce_metrics(sums)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-5) and metrics["clip_frac"] == 0.0


def test_frame_renderer_decodes_the_response_frame():
    tokenizer = tiny_tokenizer()
    renderer = T.FrameRenderer(tokenizer, LAYOUT)
    sequences = true_sequences(3)
    expected = tokenizer.decode(LAYOUT.response_frames(sequences[:, LAYOUT.prompt_len :])[:, 0].unflatten(1, (4, 4)))
    torch.testing.assert_close(renderer(sequences), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="token_grid is required"):
        T.FrameRenderer(tokenizer, SequenceLayout.single_step(8, 2, 3, 8, CODEBOOK))
    with pytest.raises(ValueError, match="does not hold"):
        T.FrameRenderer(tokenizer, LAYOUT, token_grid=(2, 4))
    with pytest.raises(ValueError, match="codebook"):
        T.FrameRenderer(tokenizer, SequenceLayout.single_step(16, 2, 3, 8, 32))


def test_repeated_frames():
    sequences = true_sequences(3)
    prompt_frames = LAYOUT.prompt_frames(sequences[:, : LAYOUT.prompt_len])
    start = LAYOUT.prompt_len
    sequences[0, start : start + FRAME_TOKENS] = prompt_frames[0, -1]  # repeats the last context frame
    sequences[1, start : start + FRAME_TOKENS] = prompt_frames[1, 0]  # repeats an older one: not a repetition
    sequences[1, start] = (prompt_frames[1, -1, 0] + 1) % CODEBOOK
    assert T.repeated_frames(LAYOUT, sequences).tolist()[:2] == [1.0, 0.0]


def test_multi_step_train_step():
    layout = SequenceLayout.multi_step(context_tokens=64, frame_tokens=16, context_frames=1, predicted_frames=2,
                                       action_dims=ACTION_DIMS, action_bins=ACTION_BINS, codebook_size=CODEBOOK)
    torch.manual_seed(0)
    tokenizer = CompressiveTokenizer(frame_size=(16, 16), channels=(8, 8), layers_per_block=1, latent_channels=4,
                                     levels=(4, 4), num_groups=4, patch_size=2, num_heads=2, attention_max_side=8)
    trainer = make_trainer(layout, tokenizer.eval().requires_grad_(False), ref_dtype="fp32")
    sequences = true_sequences(2, layout=layout)
    assert trainer.renderer(sequences).shape == (2, 2, 3, 16, 16)
    metrics = T.reduce_metrics(trainer.train_step(sequences, step=0)[0])
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["reward_l1"] > 0
    assert metrics["logp_gap"] < 1e-5


# ---- runs ------------------------------------------------------------------------------------------------------------
def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMES} for record in records]


def test_resume_equals_uninterrupted_run(files, tmp_path):
    straight = run_config(files, tmp_path / "straight")
    summary = T.rl(straight)
    assert summary["step"] == 3 and summary["model_dir"].endswith("model")
    assert T.rl(run_config(files, tmp_path / "halves", stop_at_step=2))["step"] == 2
    resumed = T.rl(run_config(files, tmp_path / "halves"))
    assert resumed["checkpoint"].endswith("step_00000003")
    expected, got = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("straight", "halves"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert without_times(read_metrics(tmp_path / "halves")) == without_times(read_metrics(tmp_path / "straight"))
    assert WorldModelTransformer.from_pretrained(tmp_path / "halves" / "model").config.vocab_size == LAYOUT.vocab_size
    with pytest.raises(ValueError, match="earlier run"):
        T.rl(run_config(files, tmp_path / "halves", resume=False))


def test_two_gloo_processes_match_one_process(files, tmp_path):
    """The global batch of 2 prompts: one process with both, or two processes with one each."""
    single = run_config(files, tmp_path / "single", steps=2)
    T.rl(single)
    settings = {**single.to_dict(), "out_dir": str(tmp_path / "pair")}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "rlvrw.train.trainer", "--config", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pair, one = read_metrics(tmp_path / "pair"), read_metrics(single.out_dir)
    assert [r["step"] for r in pair] == [1, 2]  # rank 0 alone writes the log
    for name in ("reward_mean", "reward_std", "reward_l1", "kl", "entropy", "repetition_rate"):
        assert [r[name] for r in pair] == pytest.approx([r[name] for r in one], rel=1e-5, abs=1e-7), name
    # An on-policy step's loss is sum(A * ratio) / N with ratio 1 and group advantages summing to 0: zero up to fp32
    # rounding, whose size depends on how the sum is split over ranks. So it is compared at the rounding's scale.
    assert [r["loss"] for r in pair] == pytest.approx([r["loss"] for r in one], abs=1e-6)
    got, want = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("pair", "single"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


# ---- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(group_size=0), "group_size must be a positive int"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(kl_coef=-1.0), "kl_coef must be a finite number >= 0"),
    (dict(clip_low=1.5), "clip_low"),
    (dict(kl_type="k9"), "kl_type must be one of"),
    (dict(old_logp="vllm"), "old_logp must be one of"),
    (dict(l1_weight=0.0, lpips_weight=0.0), "reward would be constant"),
    (dict(token_grid=(4, 0)), "token_grid"),
    (dict(model_overrides={"hidden": 8}), "not WorldModelConfig fields"),
    (dict(stop_at_step=9), "stop_at_step"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        T.RLConfig(**{**RUN, **overrides})


def test_run_errors(files, tmp_path, capsys):
    with pytest.raises(ValueError, match="data is required"):
        T.rl(T.RLConfig(tokenizer=files["tokenizer"]))
    assert T.main(["--data", files["data"], "--group-size", "0"]) == 2
    assert "group_size must be a positive int" in capsys.readouterr().err
    assert T.main(["--data", files["data"]]) == 2
    assert "tokenizer is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        T._train(run_config(files, tmp_path / "run"), distributed.DistributedContext(0, 3, 0, torch.device("cpu")))



def test_sampled_positions_must_share_one_range():
    class TwoRanges:  # a layout drawing from two id ranges, which the trainer's restricted output layer cannot score
        def tables(self):
            return LayoutTables(torch.zeros(2, dtype=torch.long), torch.tensor([0, 4]), torch.tensor([4, 8]),
                                torch.ones(2, dtype=torch.bool))

    assert T.sampled_token_range(LAYOUT) == (0, CODEBOOK)
    with pytest.raises(ValueError, match="sampled positions must share one legal id range"):
        T.sampled_token_range(TwoRanges())


# ---- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_train_step_has_no_host_sync():
    device = torch.device("cuda")
    config = T.RLConfig(**{**RUN, "group_size": 4, "micro_batch_size": 4})
    torch.manual_seed(0)
    policy = WorldModelTransformer(WorldModelConfig(vocab_size=LAYOUT.vocab_size, max_position_embeddings=256,
                                                    **TINY_MODEL)).to(device)
    context = distributed.DistributedContext(0, 1, 0, device)
    trainer = T.GRPOTrainer(config, policy, LAYOUT, tiny_tokenizer().to(device),
                            LPIPS("vgg", random_weights=True).to(device), context)
    assert trainer.rollout_model is not policy and trainer.sampler.use_graphs  # a bf16 copy, CUDA graphs
    sequences = true_sequences(2).to(device)
    trainer.train_step(sequences, step=0)  # first use: graph capture, backend races, FSQ tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums, timer = trainer.train_step(sequences, step=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    metrics = T.reduce_metrics(sums, timer)
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["logp_gap"] < 0.1  # bf16 sampler vs bf16-autocast trainer


@pytest.mark.gpu
def test_offloaded_reference_matches_the_resident_one():
    device = torch.device("cuda")
    torch.manual_seed(0)
    policy = WorldModelTransformer(WorldModelConfig(vocab_size=LAYOUT.vocab_size, max_position_embeddings=256,
                                                    **TINY_MODEL)).to(device)
    ids = true_sequences(4).to(device)
    results = []
    for offload in (False, True):
        reference = T.ReferencePolicy(policy, LAYOUT, 1.0, torch.bfloat16, device, offload)
        assert reference.offload == offload
        with reference.loaded() as logprobs:
            results.append(logprobs(ids))
    assert all(t.is_pinned() for t in reference.host_tensors.values())
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
