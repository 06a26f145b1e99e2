"""``rlvrw eval``: next-frame (single-step) and multi-step metrics of a world model on held-out episodes, against the
copy-last-frame baselines, with the optional rejection of repeated samples."""

import json
import math

import numpy as np
import pytest
import torch

from rlvrw.data import rt1
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models.tokenizer_files import load_tokenizer, save_tokenizer
from rlvrw.models.tokenizer import CompressiveTokenizer, FrameTokenizer
from rlvrw.models.transformer import WorldModelConfig, WorldModelTransformer
from rlvrw.train import checkpoints as checkpoint
from rlvrw.train.evaluate import METRICS, RESULT_FILE, EvalConfig, evaluate, first_non_repeating, format_table, main

CONTEXT = 2
LEVELS = (3, 3)  # 9 codes: a tiny codebook keeps the model tiny


def write_episodes(root, count=3, frames=5, size=16, still=False):
    """``count`` episodes of random frames (or of one repeated frame: ``still``) and 2-D actions; with fewer than 100
    episodes only episode 0 is in the test split."""
    rng = np.random.default_rng(0)
    for index in range(count):
        if still:
            image = np.repeat(rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8), frames, axis=0)
        else:
            image = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        rt1.save_episode(root / f"episode_{index:03d}.npz", image, rng.normal(size=(frames, 2)))
    rt1.dataset_action_stats(root)


@pytest.fixture
def setup(tmp_path):
    episodes = tmp_path / "episodes"
    episodes.mkdir()
    write_episodes(episodes)
    tokenizer = FrameTokenizer(channels=(8, 8), layers_per_block=1, latent_channels=4, levels=LEVELS, num_groups=4)
    save_tokenizer(tokenizer, tmp_path / "tok.safetensors")
    grid = 16 // tokenizer.downsample_factor
    layout = SequenceLayout.single_step(grid * grid, CONTEXT, 2, 256, tokenizer.codebook_size)
    checkpoint.save_model(tmp_path / "model", tiny_model(layout))
    return tmp_path


def tiny_model(layout):
    return WorldModelTransformer(WorldModelConfig.small(vocab_size=layout.vocab_size, hidden_size=32,
                                                        intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, max_position_embeddings=1024))


def config_for(root, **overrides):
    values = dict(model=str(root / "model"), tokenizer=str(root / "tok.safetensors"), episodes=str(root / "episodes"),
                  out_dir=str(root / "eval"), context_frames=CONTEXT, lpips_weights="random", strip_clips=1,
                  device="cpu")
    values.update(overrides)
    return EvalConfig(**values)


def test_every_row_has_every_metric_and_finite_values(setup):
    result = evaluate(config_for(setup, group_size=3, reject_repeats=True))
    assert result["clips"] == 5 - CONTEXT and result["episodes"] == 1  # episode 0 alone is held out
    for row in ("model", "model_no_repeat", "copy_last", "copy_last_tokens", "tokenizer"):
        assert set(result[row]) == {"mse", "psnr", "ssim", "lpips", "l1", "repetition_rate"}
        assert all(math.isfinite(v) for v in result[row].values()), result[row]
    assert set(result["best_of_n"]) == {"mse", "psnr", "ssim", "lpips", "l1"}
    assert set(result["mean_of_n"]) == set(result["model"])
    for name in ("mse", "lpips", "l1"):  # the best of 3 samples includes the first sample
        assert result["best_of_n"][name] <= result["model"][name] + 1e-9
    assert result["best_of_n"]["psnr"] >= result["model"]["psnr"] - 1e-9
    assert result["model_no_repeat"]["repetition_rate"] <= result["model"]["repetition_rate"]
    written = json.loads((setup / "eval" / RESULT_FILE).read_text())
    assert written["model"] == result["model"] and written["config"]["group_size"] == 3
    assert len(result["strips"]) == 1
    from PIL import Image

    with Image.open(result["strips"][0]) as strip:  # context frames | truth | prediction | tokenizer
        assert strip.size == (16 * (CONTEXT + 3), 16)


def test_copy_last_baseline_is_the_last_context_frame(setup):
    """On episodes whose frames never change, copying the last frame is exact (PSNR capped, not infinite), its
    repetition rate is 1, and the true next frame's tokens repeat too."""
    still = setup / "still"
    still.mkdir()
    write_episodes(still, still=True)
    result = evaluate(config_for(setup, episodes=str(still), strip_clips=0))
    copy = result["copy_last"]
    assert copy["mse"] == 0 and copy["l1"] == 0 and copy["psnr"] == 100.0
    assert copy["ssim"] == pytest.approx(1.0) and copy["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert copy["repetition_rate"] == 1.0 and result["tokenizer"]["repetition_rate"] == 1.0
    assert result["copy_last_tokens"] == result["tokenizer"]  # the true next frame's tokens are the last frame's
    assert result["strips"] == [] and "model_no_repeat" not in result


def test_copy_last_baseline_on_random_frames_matches_the_metrics(setup):
    from rlvrw.eval import metrics

    result = evaluate(config_for(setup, strip_clips=0, x100=True))
    frames = torch.from_numpy(rt1.load_episode(setup / "episodes" / "episode_000.npz").image).permute(0, 3, 1, 2)
    frames = frames.float() / 255
    last, truth = frames[CONTEXT - 1 : -1], frames[CONTEXT:]
    assert result["copy_last"]["mse"] == pytest.approx(100 * float(metrics.mse(last, truth).double().mean()),
                                                       rel=1e-5)
    assert result["copy_last"]["psnr"] == pytest.approx(float(metrics.psnr(last, truth).double().mean()), rel=1e-5)


# ---- multi-step ----------------------------------------------------------------------------------------------------
PREDICTED = 2  # clips of 1 + 1 + 2 frames: the 5-frame held-out episode gives 2 (starts 0 and 1)


@pytest.fixture
def multi_setup(setup):
    """Beside the single-step files: a 16x16 CompressiveTokenizer (8x8 context ids, 2x2 ids per future frame; FSQ
    input layers scaled up so that the untrained encoder's ids vary with the frame) and a tiny multi-step model
    (1 context frame, 2 predicted)."""
    torch.manual_seed(0)
    tokenizer = CompressiveTokenizer(frame_size=(16, 16), channels=(8, 8), layers_per_block=1, latent_channels=4,
                                     levels=LEVELS, num_groups=4, patch_size=4, num_heads=2, attention_max_side=8)
    with torch.no_grad():
        tokenizer.context_quant_in.weight.mul_(30)
        tokenizer.future_quant_in.weight.mul_(30)
    save_tokenizer(tokenizer, setup / "compressive.safetensors")
    layout = SequenceLayout.multi_step(64, 4, 1, PREDICTED, 2, 256, tokenizer.codebook_size)
    checkpoint.save_model(setup / "multi_model", tiny_model(layout))
    return setup


def multi_config(root, **overrides):
    return config_for(root, **{"model": str(root / "multi_model"), "tokenizer": str(root / "compressive.safetensors"),
                               "context_frames": 1, "predicted_frames": PREDICTED, **overrides})


def held_out_frames(root) -> torch.Tensor:
    frames = torch.from_numpy(rt1.load_episode(root / "episodes" / "episode_000.npz").image).permute(0, 3, 1, 2)
    return frames.float() / 255


def test_multi_step_rows_score_every_predicted_frame(multi_setup):
    from rlvrw.eval import metrics

    result = evaluate(multi_config(multi_setup, group_size=3, reject_repeats=True))
    assert result["clips"] == 2
    for row in ("model", "model_no_repeat", "mean_of_n", "copy_last", "copy_last_tokens", "tokenizer"):
        assert set(result[row]) == {*METRICS, "repetition_rate", "per_step"}, row
        assert set(result[row]["per_step"]) == set(METRICS)
        for name in METRICS:
            per_step = result[row]["per_step"][name]
            assert len(per_step) == PREDICTED and all(math.isfinite(v) for v in per_step), (row, name)
            assert result[row][name] == pytest.approx(sum(per_step) / PREDICTED), (row, name)
        assert math.isfinite(result[row]["repetition_rate"])
    assert set(result["best_of_n"]) == set(METRICS)
    assert result["best_of_n"]["lpips"] <= result["model"]["lpips"] + 1e-9
    assert result["copy_last"]["repetition_rate"] == 1.0 and result["copy_last_tokens"]["repetition_rate"] == 1.0
    # clip s: context frame s, prompt frame s+1, true future s+2, s+3; copy_last repeats frame s+1's pixels
    frames = held_out_frames(multi_setup)
    for k in range(PREDICTED):
        expected = metrics.mse(frames[1:3], frames[2 + k : 4 + k]).double().mean()
        assert result["copy_last"]["per_step"]["mse"][k] == pytest.approx(float(expected), rel=1e-5)
    assert json.loads((multi_setup / "eval" / RESULT_FILE).read_text())["model"] == result["model"]
    from PIL import Image

    with Image.open(result["strips"][0]) as strip:  # 4 real frames | 2 predicted | 2 tokenizer
        assert strip.size == (16 * (4 + 2 * PREDICTED), 16)


def always_predicting(model: WorldModelTransformer, token: int) -> WorldModelTransformer:
    """``model`` made to draw ``token`` at every frame position: the layers add nothing to the residual stream, every
    embedding is the same positive vector, and only ``token``'s output row is non-zero (logit 3200 against 0)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 100.0
    return model


def test_multi_step_repetition_rate_of_a_model_that_predicts_one_frame(multi_setup):
    """Every sample predicts the same frame twice: its second frame repeats, its first repeats when the last context
    frame's ids are that frame's. Every sample repeats, so rejecting repeats falls back to the first sample."""
    token = 4
    layout = SequenceLayout.multi_step(64, 4, 1, PREDICTED, 2, 256, 9)
    checkpoint.save_model(multi_setup / "constant_model", always_predicting(tiny_model(layout), token))
    result = evaluate(multi_config(multi_setup, model=str(multi_setup / "constant_model"), group_size=2,
                                   reject_repeats=True, strip_clips=0))
    tokenizer = load_tokenizer(multi_setup / "compressive.safetensors")
    frames = held_out_frames(multi_setup)
    _, future = tokenizer.encode(frames[[0, 1]], frames[torch.tensor([[1, 2, 3], [2, 3, 4]])])
    last_context_is_constant = (future[:, 0] == token).flatten(1).all(dim=1).double()  # per clip
    expected = float(((PREDICTED - 1 + last_context_is_constant) / PREDICTED).mean())
    assert expected < 1  # some first prediction is new, so a rate counting every frame as repeated would fail
    assert result["model"]["repetition_rate"] == pytest.approx(expected)
    assert result["model_no_repeat"] == result["model"] and result["mean_of_n"]["repetition_rate"] == \
        pytest.approx(expected)


def test_first_non_repeating_picks_the_first_sample_that_repeats_no_frame():
    repetition = torch.tensor([0.5, 0.0, 0.0,  # the first repeats a frame: the second is chosen
                               0.0, 1.0, 0.0,  # the first repeats nothing: chosen
                               1.0, 0.5, 1.0])  # all repeat: the first is the fallback
    assert first_non_repeating(repetition, 3).tolist() == [1, 3, 6]
    assert first_non_repeating(torch.tensor([0.5, 0.0]), 1).tolist() == [0, 1]


def test_multi_step_bad_inputs_raise_value_errors_naming_the_argument(multi_setup):
    with pytest.raises(ValueError, match="predicted_frames"):
        multi_config(multi_setup, predicted_frames=0)
    with pytest.raises(ValueError, match="model .* cannot read"):  # a single-step model: too small a vocabulary
        evaluate(multi_config(multi_setup, model=str(multi_setup / "model")))
    with pytest.raises(ValueError, match="episodes"):  # the held-out episode is shorter than 1 + 1 + 4 frames
        evaluate(multi_config(multi_setup, predicted_frames=4))
    large = multi_setup / "large"
    large.mkdir()
    write_episodes(large, size=32)
    with pytest.raises(ValueError, match=r"episodes .* hold \(32, 32\) frames.* tokenizer codes \(16, 16\)"):
        evaluate(multi_config(multi_setup, episodes=str(large)))


def test_bad_inputs_raise_value_errors_naming_the_argument(setup):
    with pytest.raises(ValueError, match="group_size"):
        config_for(setup, group_size=0)
    with pytest.raises(ValueError, match="temperature"):
        config_for(setup, temperature=0)
    with pytest.raises(ValueError, match="split"):
        config_for(setup, split="valid")
    with pytest.raises(ValueError, match="model"):
        evaluate(config_for(setup, model=str(setup / "nowhere")))
    with pytest.raises(ValueError, match="episodes"):
        evaluate(config_for(setup, episodes=""))
    with pytest.raises(ValueError, match="episodes"):  # no held-out episode is as long as a clip
        evaluate(config_for(setup, context_frames=5))
    with pytest.raises(ValueError, match="unknown keys"):
        EvalConfig.from_dict({"bogus": 1})


def test_command_prints_the_table_and_refuses_missing_files(setup, capsys):
    assert main(["--model", str(setup / "model"), "--tokenizer", str(setup / "tok.safetensors"), "--episodes",
                 str(setup / "episodes"), "--out", str(setup / "cli"), "--context-frames", str(CONTEXT),
                 "--lpips-weights", "random", "--device", "cpu", "--strip-clips", "0"]) == 0
    printed = capsys.readouterr().out
    assert "copy_last" in printed and "tokenizer" in printed and (setup / "cli" / RESULT_FILE).is_file()
    assert main(["--model", str(setup / "model"), "--tokenizer", str(setup / "missing.safetensors"),
                 "--episodes", str(setup / "episodes")]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_format_table_shows_missing_cells_as_dashes():
    table = format_table({"a": {"mse": 1.0, "repetition_rate": 0.5}, "b": {"mse": 2.0}})
    assert table.splitlines()[2].rstrip().endswith("-")
