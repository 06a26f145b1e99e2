"""MLE pre-training (rlvrw.train.pretrain) on small random token caches and a tiny model:

* resuming from a checkpoint halfway gives bit-identical parameters and losses to an uninterrupted run;
* gradient accumulation equals one big batch;
* the loss equals cross-entropy from full logits over the layout's loss mask;
* the token cache: round trip, a directory with a corrupt file (skipped and counted), padding, multi-step clips;
* the clip sampler is a pure function of (seed, step) and takes its tokens from the cache;
* ``tokenize_episodes`` with a stand-in tokenizer, and the command line from episode files with a real one;
* ``tokenize_clips``: multi-step clips coded by a tiny compressive tokenizer, and the command line that writes them;
* run logs (JSONL, resume truncation, TensorBoard when installed) and input errors.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlvrw.data import clips as CL
from rlvrw.data import token_cache as TC
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models import WorldModelConfig, WorldModelTransformer
from rlvrw.train import build as B
from rlvrw.train import tokenize as TK
from rlvrw.train import pretrain as P
from rlvrw.train.logging import RunLogger, read_metrics

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CODEBOOK, FRAME_TOKENS, ACTION_DIMS = 64, 16, 3


def write_cache(path, episodes=8, frames=12, seed=0, full_length=False, **extra):
    """Random episodes of 5 to ``frames`` frames (all ``frames`` long with ``full_length``)."""
    rng = np.random.default_rng(seed)
    frame_ids = rng.integers(0, CODEBOOK, (episodes, frames, FRAME_TOKENS))
    action_bins = rng.integers(0, 256, (episodes, frames, ACTION_DIMS))
    lengths = None if full_length else rng.integers(5, frames + 1, episodes)
    TC.save_token_cache(path, frame_ids, action_bins, episode_lengths=lengths, codebook_size=CODEBOOK, **extra)
    return path


def tiny_config(tmp_path, out="run", **overrides) -> P.PretrainConfig:
    data = tmp_path / "tokens.npz"
    if not data.exists():
        write_cache(data)
    settings = dict(data=str(data), out_dir=str(tmp_path / out), context_frames=2, steps=4, micro_batch_size=2,
                    grad_accum_steps=2, warmup_steps=2, log_every=1, save_every=100, model_overrides=TINY_MODEL,
                    progress=False, tensorboard="off")
    return P.PretrainConfig(**{**settings, **overrides})


def final_weights(config: P.PretrainConfig) -> dict:
    return load_file(f"{config.out_dir}/model/model.safetensors")


def losses(config: P.PretrainConfig) -> list[float]:
    return [record["loss"] for record in read_metrics(config.out_dir)]


# ---- training ------------------------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted_training(tmp_path):
    straight = tiny_config(tmp_path, "straight")
    summary = P.pretrain(straight)
    assert summary["step"] == 4 and summary["model_dir"].endswith("model")

    halves = tiny_config(tmp_path, "halves", stop_at_step=2)
    first = P.pretrain(halves)
    assert first["step"] == 2 and "model_dir" not in first
    second = P.pretrain(tiny_config(tmp_path, "halves"))
    assert second["checkpoint"].endswith("step_00000004")

    expected, resumed = final_weights(straight), final_weights(halves)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    assert losses(straight) == losses(halves)  # each step logged once, the same numbers
    assert [r["step"] for r in read_metrics(halves.out_dir)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="earlier run"):
        P.pretrain(tiny_config(tmp_path, "halves", resume=False))
    straight_opt = torch.load(f"{straight.out_dir}/checkpoints/step_00000004/optimizer.pt", weights_only=True)
    halves_opt = torch.load(f"{halves.out_dir}/checkpoints/step_00000004/optimizer.pt", weights_only=True)
    for name, state in straight_opt["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], halves_opt["optimizer"]["state"][name]["exp_avg_sq"]), name


def test_accumulation_equals_one_big_batch(tmp_path):
    accumulated = tiny_config(tmp_path, "accumulated", steps=2, micro_batch_size=1, grad_accum_steps=4)
    big = tiny_config(tmp_path, "big", steps=2, micro_batch_size=4, grad_accum_steps=1)
    P.pretrain(accumulated)
    P.pretrain(big)
    assert losses(accumulated) == pytest.approx(losses(big), rel=1e-6)
    a, b = final_weights(accumulated), final_weights(big)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_loss_is_cross_entropy_of_frame_tokens(tmp_path):
    layout = SequenceLayout.single_step(FRAME_TOKENS, 2, ACTION_DIMS, 256, CODEBOOK)
    model = WorldModelTransformer(WorldModelConfig(vocab_size=layout.vocab_size, **TINY_MODEL))
    frames = torch.randint(0, CODEBOOK, (3, layout.num_frames, FRAME_TOKENS))
    actions = torch.randint(0, 256, (3, layout.num_actions, ACTION_DIMS))
    ids = layout.build(frames, actions)
    nll = P.NextTokenLoss(model, layout)(ids)
    inputs, targets, mask = layout.next_token_targets(ids)
    token_nll = torch.nn.functional.cross_entropy(model(inputs).transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(nll, token_nll[mask].sum())
    assert mask[0].sum() == FRAME_TOKENS  # the predicted frame only


def test_flops_count_the_head_on_loss_tokens_only():
    layout = SequenceLayout.single_step()
    flops = B.training_flops_per_sequence(WorldModelConfig(vocab_size=layout.vocab_size), layout)
    tokens, loss_tokens, width = layout.seq_len - 1, 320, 768
    per_layer = 4 * width * width + 3 * width * 3072  # q k v o, gate up down
    expected = (6 * 12 * per_layer * tokens + 6 * width * layout.vocab_size * loss_tokens
                + 6 * 12 * width * tokens * tokens)
    assert flops == expected


# ---- the token cache -----------------------------------------------------------------------------------------------
def test_cache_round_trip_uses_narrow_dtypes(tmp_path):
    path = write_cache(tmp_path / "c.npz")
    with np.load(path) as raw:
        assert raw["frame_ids"].dtype == np.int16 and raw["action_bins"].dtype == np.uint8
    cache = TC.load_token_cache(path)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(cache.frame_ids, rng.integers(0, CODEBOOK, (8, 12, FRAME_TOKENS)))
    assert cache.codebook_size == CODEBOOK and cache.episode_lengths.dtype == np.int64


def test_cache_directory_skips_bad_files_and_pads(tmp_path, caplog):
    write_cache(tmp_path / "a.npz", episodes=2, frames=6, seed=1)
    write_cache(tmp_path / "b.npz", episodes=3, frames=9, seed=2)
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "d.npz", frame_ids=np.zeros((1, 6, 4), np.int16), action_bins=np.zeros((1, 6, 3), np.uint8))
    cache = TC.load_token_cache(tmp_path)
    assert cache.frame_ids.shape == (5, 9, FRAME_TOKENS)
    assert [p.rsplit("/", 1)[-1] for p in cache.skipped_files] == ["c.npz", "d.npz"]
    assert "2 skipped so far" in caplog.text
    assert (cache.frame_ids[:2, 6:] == 0).all() and cache.episode_lengths[:2].max() <= 6
    with pytest.raises(ValueError, match="no usable"):
        TC.load_token_cache(tmp_path / "c.npz")


def test_sampler_is_a_function_of_seed_and_step(tmp_path):
    cache = TC.load_token_cache(write_cache(tmp_path / "c.npz"))
    layout = CL.layout_for_cache(cache, context_frames=2, codebook_size=999, action_bins=256)
    assert layout.codebook_size == CODEBOOK  # the cache's own wins
    sampler = CL.ClipSampler(cache, layout, frame_skip=2, seed=3)
    batch = sampler.sequences(5, 6, slice(0, 6))
    assert torch.equal(batch, sampler.sequences(5, 6, slice(0, 6)))
    assert torch.equal(batch[2:4], sampler.sequences(5, 6, slice(2, 4)))
    assert not torch.equal(batch, sampler.sequences(6, 6, slice(0, 6)))
    episodes, starts = sampler.clips(5, 6)
    assert (starts + 2 * (layout.num_frames - 1) < cache.episode_lengths[episodes]).all()
    prompt, response = layout.split(batch)
    for row, (e, s) in enumerate(zip(episodes, starts, strict=True)):
        np.testing.assert_array_equal(layout.prompt_frames(prompt)[row].numpy(), cache.frame_ids[e, [s, s + 2]])
        np.testing.assert_array_equal(layout.response_frames(response)[row, 0].numpy(), cache.frame_ids[e, s + 4])


def test_multi_step_cache_rows_are_clips(tmp_path):
    rng = np.random.default_rng(0)
    path = write_cache(tmp_path / "m.npz", episodes=4, frames=4, full_length=True,
                       context_ids=rng.integers(0, CODEBOOK, (4, 10)))
    cache = TC.load_token_cache(path)
    layout = CL.layout_for_cache(cache, context_frames=1, codebook_size=CODEBOOK, action_bins=256)
    assert (layout.mode, layout.context_tokens, layout.predicted_frames) == ("multi_step", 10, 3)
    sampler = CL.ClipSampler(cache, layout)
    episodes, starts = sampler.clips(0, 3)
    assert (starts == 0).all()
    ids = sampler.sequences(0, 3, slice(0, 3))
    np.testing.assert_array_equal(ids[:, :10].numpy() - CODEBOOK, cache.context_ids[episodes])
    with pytest.raises(ValueError, match="frame_skip"):
        CL.ClipSampler(cache, layout, frame_skip=2)


class PoolingTokenizer:
    """A stand-in for FrameTokenizer: 4x4 average pooling, quantized to CODEBOOK levels."""

    codebook_size = CODEBOOK

    def encode(self, frames):
        assert frames.dtype == torch.float32 and frames.shape[1] == 3 and 0 <= frames.min() <= frames.max() <= 1
        pooled = torch.nn.functional.avg_pool2d(frames.mean(1, keepdim=True), 4)[:, 0]
        return (pooled * (CODEBOOK - 1)).round().long()


def test_tokenize_episodes(tmp_path, caplog):
    rng = np.random.default_rng(0)
    episodes = [
        (rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), rng.integers(0, 256, (5, ACTION_DIMS))),
        (rng.integers(0, 256, (3, 16, 16, 3)).astype(np.float32), rng.integers(0, 256, (3, ACTION_DIMS))),  # bad
        (torch.from_numpy(rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)), rng.integers(0, 256, (7, 3))),
    ]
    summary = TK.tokenize_episodes(PoolingTokenizer(), episodes, tmp_path / "t.npz", frames_per_batch=2,
                                  progress=False)
    assert summary == {"episodes": 2, "frames": 12, "skipped": 1, "path": str(tmp_path / "t.npz")}
    assert "skipping episode 1" in caplog.text
    cache = TC.load_token_cache(tmp_path / "t.npz")
    assert cache.frame_ids.shape == (2, 7, 16) and cache.codebook_size == CODEBOOK
    assert cache.episode_lengths.tolist() == [5, 7]
    frames = torch.from_numpy(episodes[0][0]).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_array_equal(cache.frame_ids[0, :5], PoolingTokenizer().encode(frames).flatten(1).numpy())
    np.testing.assert_array_equal(cache.action_bins[1, :7], episodes[2][1])
    with pytest.raises(ValueError, match="no usable episode"):
        TK.tokenize_episodes(PoolingTokenizer(), episodes[1:2], tmp_path / "u.npz", progress=False)
    with pytest.raises(ValueError, match="encode"):
        TK.tokenize_episodes(object(), episodes, tmp_path / "u.npz")


def test_command_line_from_episode_files(tmp_path):
    rt1 = pytest.importorskip("rlvrw.data.rt1")
    checkpoints = pytest.importorskip("rlvrw.models.tokenizer_files")
    from rlvrw.models.tokenizer import FrameTokenizer

    rng = np.random.default_rng(0)
    episode_dir = tmp_path / "episodes"
    for index in range(3):
        rt1.save_episode(episode_dir / f"ep{index:03d}.npz", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
                         rng.normal(size=(6, ACTION_DIMS)))
    (episode_dir / "ep999.npz").write_bytes(b"truncated")
    torch.manual_seed(0)
    tokenizer = FrameTokenizer(channels=(8, 8), layers_per_block=1, latent_channels=8, levels=(4, 4), num_groups=4)
    checkpoints.save_tokenizer(tokenizer, tmp_path / "tok.safetensors")
    config = {"model_overrides": TINY_MODEL, "context_frames": 2, "steps": 2, "warmup_steps": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    parser = argparse.ArgumentParser(prog="rlvrw")
    P.add_cli(parser.add_subparsers())  # as rlvrw.cli registers it
    args = parser.parse_args([
        "pretrain", "--config", str(tmp_path / "config.json"), "--episodes", str(episode_dir), "--tokenizer",
        str(tmp_path / "tok.safetensors"), "--out", str(tmp_path / "run"), "--micro-batch-size", "2",
        "--no-progress", "--tensorboard", "off", "--action-bins", "8",
    ])
    assert args.func(args) == 0
    cache = TC.load_token_cache(tmp_path / "run" / "tokens.npz")
    assert cache.frame_ids.shape == (2, 6, 64) and cache.codebook_size == 16  # ep000 is the test split
    assert cache.action_bins.min() == 0 and cache.action_bins.max() == 7  # the actions are binned as asked
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["micro_batch_size"] == 2 and saved["steps"] == 2
    model = WorldModelTransformer.from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == 16 + 8 + 2


def tiny_compressive_tokenizer():
    """A 16x16-frame CompressiveTokenizer: 8x8 = 64 context ids, 2x2 = 4 ids per future frame, 9 codes. Its FSQ
    input layers are scaled up so that the untrained encoder's ids vary with the frame (else nearly all are the
    middle code, and a clip coded from the wrong frames would go unnoticed)."""
    from rlvrw.models.tokenizer import CompressiveTokenizer

    torch.manual_seed(0)
    tokenizer = CompressiveTokenizer(frame_size=(16, 16), channels=(8, 8), layers_per_block=1, latent_channels=4,
                                     levels=(3, 3), num_groups=4, patch_size=4, num_heads=2, attention_max_side=8)
    with torch.no_grad():
        tokenizer.context_quant_in.weight.mul_(30)
        tokenizer.future_quant_in.weight.mul_(30)
    return tokenizer.eval()


def test_clip_times():
    np.testing.assert_array_equal(CL.clip_times(9, 3, frame_skip=2, stride=3), [[0, 2, 4], [3, 5, 7]])
    np.testing.assert_array_equal(CL.clip_times(4, 4), [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="fewer than the 7"):
        CL.clip_times(6, 4, frame_skip=2)


def test_tokenize_clips(tmp_path, caplog):
    """Clips of 1 + C + K = 4 frames, non-overlapping by default: a 9-frame episode gives 2 (frame 8 is left over),
    a 3-frame one none (skipped), a 12-frame one 3."""
    tokenizer = tiny_compressive_tokenizer()
    rng = np.random.default_rng(0)
    episodes = [(rng.integers(0, 256, (length, 16, 16, 3), dtype=np.uint8), rng.integers(0, 256, (length, 2)))
                for length in (9, 3, 12)]
    summary = TK.tokenize_clips(tokenizer, episodes, tmp_path / "m.npz", context_frames=1, predicted_frames=2,
                               progress=False)
    assert summary == {"episodes": 2, "clips": 5, "skipped": 1, "path": str(tmp_path / "m.npz")}
    assert "skipping episode 1" in caplog.text and "fewer than the 4" in caplog.text
    cache = TC.load_token_cache(tmp_path / "m.npz")
    assert cache.context_ids.shape == (5, 64) and cache.frame_ids.shape == (5, 3, 4)
    assert cache.action_bins.shape == (5, 3, 2) and cache.codebook_size == 9
    assert cache.episode_lengths.tolist() == [3] * 5
    # episode 0's clips start at frames 0 and 4: context frames 0 and 4, layout frames 1-3 and 5-7
    frames = torch.from_numpy(episodes[0][0]).permute(0, 3, 1, 2).float() / 255
    future = torch.tensor([[1, 2, 3], [5, 6, 7]])
    context_ids, future_ids = tokenizer.encode(frames[[0, 4]], frames[future])
    np.testing.assert_array_equal(cache.context_ids[:2], context_ids.flatten(1).numpy())
    np.testing.assert_array_equal(cache.frame_ids[:2], future_ids.flatten(2).numpy())
    np.testing.assert_array_equal(cache.action_bins[:2], episodes[0][1][future.numpy()])
    np.testing.assert_array_equal(cache.action_bins[4], episodes[2][1][[9, 10, 11]])
    layout = CL.layout_for_cache(cache, context_frames=1, codebook_size=9, action_bins=256)
    assert (layout.mode, layout.context_tokens, layout.frame_tokens, layout.predicted_frames) == \
        ("multi_step", 64, 4, 2)

    overlapping = TK.tokenize_clips(tokenizer, episodes[:1], tmp_path / "o.npz", context_frames=1,
                                   predicted_frames=2, frame_skip=2, clip_stride=1, progress=False)
    assert overlapping["clips"] == 3  # starts 0, 1, 2: frames s, s+2, s+4, s+6 of 9
    with pytest.raises(ValueError, match="tokenizer must be a CompressiveTokenizer"):
        TK.tokenize_clips(PoolingTokenizer(), episodes, tmp_path / "x.npz", context_frames=1, predicted_frames=2)
    with pytest.raises(ValueError, match="predicted_frames"):
        TK.tokenize_clips(tokenizer, episodes, tmp_path / "x.npz", context_frames=1, predicted_frames=0)
    with pytest.raises(ValueError, match="no usable episode"):
        TK.tokenize_clips(tokenizer, episodes[1:2], tmp_path / "x.npz", context_frames=1, predicted_frames=2,
                         progress=False)


def test_command_line_writes_a_multi_step_cache_from_episode_files(tmp_path, caplog):
    """With a CompressiveTokenizer checkpoint, `rlvrw pretrain --episodes` writes clips and trains multi-step. With
    --frame-skip 2 a clip of 1 + 1 + 2 frames spans 7 of an episode's 9 frames: one clip per episode, whose rows
    the training then reads frame after frame."""
    import logging

    from rlvrw.data import rt1
    from rlvrw.models.tokenizer_files import save_tokenizer

    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(0)
    episode_dir = tmp_path / "episodes"
    for index, length in enumerate((9, 9, 9, 2)):  # ep000 is the test split; ep003 is shorter than a clip
        rt1.save_episode(episode_dir / f"ep{index:03d}.npz",
                         rng.integers(0, 256, (length, 16, 16, 3), dtype=np.uint8), rng.normal(size=(length, 2)))
    (episode_dir / "ep999.npz").write_bytes(b"truncated")
    save_tokenizer(tiny_compressive_tokenizer(), tmp_path / "tok.safetensors")
    assert P.main([
        "--episodes", str(episode_dir), "--tokenizer", str(tmp_path / "tok.safetensors"), "--out",
        str(tmp_path / "run"), "--context-frames", "1", "--predicted-frames", "2", "--frame-skip", "2", "--steps", "2",
        "--warmup-steps", "1", "--micro-batch-size", "2", "--model-overrides", json.dumps(TINY_MODEL),
        "--action-bins", "8", "--no-progress", "--tensorboard", "off",
    ]) == 0
    assert "skipping episode file (1 skipped so far)" in caplog.text  # ep999, by the episode reader
    assert "tokenized 2 clips of 2 episodes (1 skipped)" in caplog.text  # ep003, by tokenize_clips
    cache = TC.load_token_cache(tmp_path / "run" / "tokens.npz")
    assert cache.context_ids.shape == (2, 64) and cache.frame_ids.shape == (2, 3, 4)
    train = list(CL.episode_stream(episode_dir, action_bins=8))  # ep001, ep002 (ep003 too short for a clip)
    for row in range(2):  # context frame 0, layout frames 2, 4, 6 and the actions taken there
        np.testing.assert_array_equal(cache.action_bins[row], train[row][1][[2, 4, 6]])
    layout = CL.layout_for_cache(cache, context_frames=1, codebook_size=9, action_bins=8)
    model = WorldModelTransformer.from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == layout.vocab_size == 2 * 9 + 8 + 2
    assert read_metrics(tmp_path / "run")[-1]["step"] == 2


# ---- logs ----------------------------------------------------------------------------------------------------------
def test_run_logger_drops_redone_steps_on_resume(tmp_path):
    log = RunLogger(tmp_path, total_steps=4, tensorboard="off", progress=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a torn line from a killed run
    resumed = RunLogger(tmp_path, total_steps=4, start_step=2, tensorboard="off", progress=False)
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert RunLogger(tmp_path / "off", total_steps=1, enabled=False).path.parent.exists() is False


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLogger(tmp_path, total_steps=1, tensorboard="on", progress=True)
    log.log(1, {"loss": 1.5, "note": "text is kept out of TensorBoard"})
    log.advance()
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# ---- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    ({"steps": 0}, "steps"),
    ({"micro_batch_size": 1.5}, "micro_batch_size"),
    ({"lr": 0}, "lr"),
    ({"min_lr_ratio": 2}, "min_lr_ratio"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"precision": "fp8"}, "precision"),
    ({"parallel": "tp"}, "parallel"),
    ({"episodes": "dir"}, "exactly one"),
    ({"stop_at_step": 9}, "stop_at_step"),
    ({"predicted_frames": 0}, "predicted_frames"),
    ({"clip_stride": -1}, "clip_stride"),
    ({"model_overrides": "big"}, "model_overrides"),
    ({"model_overrides": {"hidden": 3}}, "not WorldModelConfig fields"),
])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, **overrides)


def test_command_line_reports_bad_settings(tmp_path, capsys):
    assert P.main(["--data", "x.npz", "--steps", "0"]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err


def test_data_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        P.PretrainConfig.from_dict({"data": "x", "batch": 3})
    with pytest.raises(ValueError, match="path must be a token cache"):
        TC.load_token_cache(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="action_bins must be"):
        TC.save_token_cache(tmp_path / "x.npz", np.zeros((2, 3, 4), int), np.zeros((2, 4, 1), int))
    with pytest.raises(ValueError, match="codebook_size"):
        TC.save_token_cache(tmp_path / "x.npz", np.full((1, 3, 4), 9), np.zeros((1, 3, 1), int), codebook_size=9)
    cache = TC.load_token_cache(write_cache(tmp_path / "c.npz", frames=5))
    layout = CL.layout_for_cache(cache, context_frames=2, codebook_size=CODEBOOK, action_bins=256)
    with pytest.raises(ValueError, match="no episode"):
        CL.ClipSampler(cache, layout, frame_skip=3)
    small = SequenceLayout.single_step(FRAME_TOKENS, 2, ACTION_DIMS, 256, codebook_size=8)
    with pytest.raises(ValueError, match="frame_ids holds ids"):
        CL.ClipSampler(cache, small)
