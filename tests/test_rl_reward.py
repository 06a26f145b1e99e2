"""The ``reward=`` setting of ``rlvrw rl`` and ``rlvrw train``: any ``ops.frame_reward`` metric or weighted sum, its
terms logged as they come from the reward (never recovered by inverting it), no LPIPS network loaded for a pixel
reward, and unknown names refused with the choices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlvrw.data import token_cache as TC
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models import FrameTokenizer, WorldModelConfig, WorldModelTransformer
from rlvrw.models.tokenizer_files import save_tokenizer
from rlvrw.train import distributed
from rlvrw.train import pretrain as P
from rlvrw.train import trainer as T
from rlvrw.train.logging import read_metrics
from rlvrw.train.pipeline import resolve_config

CODEBOOK, FRAME_TOKENS, ACTION_DIMS, ACTION_BINS = 16, 16, 3, 8
LAYOUT = SequenceLayout.single_step(FRAME_TOKENS, context_frames=2, action_dims=ACTION_DIMS, action_bins=ACTION_BINS,
                                    codebook_size=CODEBOOK)
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
RUN = dict(context_frames=2, action_bins=ACTION_BINS, steps=2, prompts_per_step=2, group_size=4, micro_batch_size=8,
           rollout_prompts=2, model_overrides=TINY_MODEL, lpips_weights="random", progress=False, tensorboard="off",
           save_every=100)


def tiny_tokenizer() -> FrameTokenizer:
    torch.manual_seed(0)  # 16x16 frames <-> 4x4 ids
    return FrameTokenizer(channels=(8, 8, 8), layers_per_block=1, latent_channels=4, levels=(4, 4),
                          num_groups=4).eval().requires_grad_(False)


def true_sequences(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, CODEBOOK, (batch, LAYOUT.num_frames, FRAME_TOKENS), generator=gen)
    actions = torch.randint(0, ACTION_BINS, (batch, LAYOUT.num_actions, ACTION_DIMS), generator=gen)
    return LAYOUT.build(frames, actions)


def test_a_pixel_reward_logs_its_own_terms():
    config = T.RLConfig(**RUN, reward="mae+0.5*ssim")
    torch.manual_seed(0)
    policy = WorldModelTransformer(WorldModelConfig(vocab_size=LAYOUT.vocab_size, max_position_embeddings=256,
                                                    **TINY_MODEL))
    trainer = T.GRPOTrainer(config, policy, LAYOUT, tiny_tokenizer(), None, distributed.setup("cpu"))
    metrics = T.reduce_metrics(trainer.train_step(true_sequences(2), step=0)[0])
    assert metrics["reward_mean"] == pytest.approx(-metrics["reward_mae"] + 0.5 * metrics["reward_ssim"], abs=1e-6)
    assert metrics["reward_mae"] == pytest.approx(metrics["reward_l1"], rel=1e-5)
    assert 0 < metrics["reward_ssim"] < 1 and "reward_lpips" not in metrics and "reward_psnr" not in metrics


def test_rl_run_with_ssim_reward_loads_no_lpips(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    TC.save_token_cache(tmp_path / "tokens.npz", rng.integers(0, CODEBOOK, (4, 6, FRAME_TOKENS)),
                       rng.integers(0, ACTION_BINS, (4, 6, ACTION_DIMS)), codebook_size=CODEBOOK)
    save_tokenizer(tiny_tokenizer(), tmp_path / "tokenizer.safetensors")

    def no_lpips(*args):
        raise AssertionError("a pixel reward must not load an LPIPS network")

    monkeypatch.setattr(T, "load_lpips", no_lpips)
    T.rl(T.RLConfig(**RUN, reward="ssim", data=str(tmp_path / "tokens.npz"),
                    tokenizer=str(tmp_path / "tokenizer.safetensors"), out_dir=str(tmp_path / "rl")))
    logged = read_metrics(tmp_path / "rl")
    assert logged[-1]["reward_mean"] == pytest.approx(logged[-1]["reward_ssim"], abs=1e-9)


def test_weights_apply_to_l1_plus_lpips_only():
    assert T.RLConfig(**RUN).reward_weights() == {"mae": 1.0, "lpips": 1.0}
    assert T.RLConfig(**RUN, l1_weight=0.5, lpips_weight=2.0).reward_weights() == {"mae": 0.5, "lpips": 2.0}
    assert T.RLConfig(**RUN, reward="psnr", l1_weight=0.0, lpips_weight=0.0).reward_weights() == {"psnr": 1.0}


@pytest.mark.parametrize("reward", ["l2", "mae+ssim2", "0*mae"])
def test_unknown_rewards_are_refused_with_the_choices(reward):
    match = "constant" if reward == "0*mae" else r"metric must be one of \['mae', 'mse', 'psnr', 'ssim', 'lpips'"
    with pytest.raises(ValueError, match=match):
        T.RLConfig(**RUN, reward=reward)
    if reward != "0*mae":
        with pytest.raises(ValueError, match="metric must be one of"):
            resolve_config(overrides={"reward": reward})


def test_rl_command_exits_2_naming_the_choices(capsys):
    assert T.main(["--data", "x.npz", "--tokenizer", "t.safetensors", "--reward", "lpips2"]) == 2
    assert "'l1+lpips'" in capsys.readouterr().err


def test_pipeline_passes_reward_and_copy_prior():
    config = resolve_config(overrides={"reward": "ssim", "copy_prior": True})
    assert config.reward == "ssim" and config.copy_prior
