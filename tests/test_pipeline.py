"""``rlvrw train``: settings from presets, files and key=value arguments; the smoke preset end to end."""

import json
import math

import pytest

from rlvrw.models import CompressiveTokenizer, checkpoints
from rlvrw.train.pipeline import DEFAULT_CONFIG, PRESETS, main, parse_overrides, resolve_config

DESIGN_KEYS = {"mse", "psnr", "ssim", "lpips", "repetition_rate"}


def test_settings_layer_defaults_preset_file_then_overrides(tmp_path):
    assert resolve_config() == DEFAULT_CONFIG
    smoke = resolve_config(overrides={"preset": "smoke"})
    assert smoke.tokenizer_steps == PRESETS["smoke"]["tokenizer_steps"]
    json_file = tmp_path / "settings.json"
    json_file.write_text(json.dumps({"preset": "smoke", "rl_steps": 5, "seed": 3}))
    config = resolve_config(json.loads(json_file.read_text()), parse_overrides(["rl_steps=7", "sim=pusht"]))
    assert (config.preset, config.rl_steps, config.seed, config.sim) == ("smoke", 7, 3, "pusht")
    assert config.pretrain_steps == PRESETS["smoke"]["pretrain_steps"]


def test_multistep_preset_is_compressive_with_its_clip():
    config = resolve_config(overrides={"preset": "multistep"})
    assert config.multi_step and config.token_grid == (16, 16) and config.clip_frames == 1 + 1 + 3
    assert not resolve_config().multi_step and resolve_config().clip_frames == 2


def test_yaml_config_file(tmp_path):
    pytest.importorskip("yaml")
    from rlvrw.train.pipeline import read_config_file

    path = tmp_path / "settings.yaml"
    path.write_text("rl_steps: 9\ntokenizer_channels: [16, 32]\n")
    config = resolve_config(read_config_file(path))
    assert config.rl_steps == 9 and config.tokenizer_channels == [16, 32] and config.token_grid == (16, 16)


def test_override_values_are_json_where_they_parse():
    assert parse_overrides(["a=3", "b=[1,2]", "c=true", "d-e=text", "f=1e-4"]) == \
        {"a": 3, "b": [1, 2], "c": True, "d_e": "text", "f": 1e-4}


@pytest.mark.parametrize("overrides, match", [
    ({"bogus": 1}, "unknown settings"),
    ({"preset": "huge"}, "preset"),
    ({"rl_steps": 0}, "rl_steps"),
    ({"rl_steps": "many"}, "rl_steps"),
    ({"progress": 1}, "progress"),
    ({"tokenizer_lpips": "resnet"}, "tokenizer_lpips"),
    ({"frame_size": 62}, "frame_size"),
    ({"sim_frames": 1}, "sim_frames"),
    ({"tokenizer_consistency": -0.5}, "tokenizer_consistency"),
    ({"eval_top_k": -1}, "eval_top_k"),
    ({"sim_action_repeat": -2}, "sim_action_repeat"),
    ({"tokenizer_kind": "vqgan"}, "tokenizer_kind must be one of"),
    ({"tokenizer_kind": "compressive", "tokenizer_patch_size": 3}, r"tokenizer_patch_size \(3\) must divide"),
    ({"tokenizer_kind": "compressive", "predicted_frames": 1, "tokenizer_future_frames": 3},
     r"tokenizer_future_frames \(3\) must be at most a clip's 2"),
    ({"tokenizer_kind": "compressive", "sim_frames": 8}, r"sim_frames \(8\) must hold a clip of 9 frames"),
    ({"predicted_frames": 0}, "predicted_frames"),
])
def test_bad_settings_raise_value_errors_naming_them(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(overrides=overrides)


def test_bad_arguments_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path), "not-a-setting"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_smoke_preset_runs_every_stage_and_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gym_pusht")
    monkeypatch.setenv("RLVRW_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--quick", "lpips_weights=random", "progress=false"]
    assert main(argv) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    for name in ("mle", "rlvr"):
        assert DESIGN_KEYS <= set(result[name])
        assert all(math.isfinite(value) for value in result[name].values()), result[name]
    assert result["config"]["preset"] == "smoke"
    assert result["baselines"]["copy_last"]["repetition_rate"] == 1.0
    assert result["baselines"]["copy_last_tokens"]["repetition_rate"] == 1.0
    assert set(result["greedy"]) == {"mle", "rlvr"} and DESIGN_KEYS <= set(result["greedy"]["rlvr"])
    greedy = json.loads((run_dir / "eval_mle_greedy" / "eval.json").read_text())
    assert greedy["config"]["top_k"] == 1 and greedy["group_size"] == 1
    assert result["greedy"]["mle"]["lpips"] == greedy["model"]["lpips"]
    assert (run_dir / "pretrain" / "model").is_dir() and (run_dir / "rl" / "model").is_dir()
    printed = capsys.readouterr().out
    assert "mle" in printed and "rlvr" in printed and "copy_last" in printed

    # a second run reuses every stage's output
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tokenizer: reusing" in printed and printed.count("eval: reusing") == 4  # sampled and greedy
    assert json.loads((run_dir / "eval.json").read_text())["mle"] == result["mle"]


def test_compressive_smoke_run_is_multi_step_and_reports_the_next_frame(tmp_path, monkeypatch, capsys):
    """tokenizer_kind=compressive: a CompressiveTokenizer trained on clips, multi-step pre-training, RL and evaluation;
    eval.json's next_frame rows are the first horizon of the evaluation's per-step means."""
    pytest.importorskip("gym_pusht")
    monkeypatch.setenv("RLVRW_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), "--quick", "lpips_weights=random", "progress=false",
                 "tokenizer_kind=compressive", "tokenizer_patch_size=2", "predicted_frames=2",
                 "eval_reject_repeats=true", "copy_prior=true", "reward=mae+ssim"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    mle = json.loads((run_dir / "eval_mle" / "eval.json").read_text())
    assert len(mle["model"]["per_step"]["lpips"]) == 2
    assert result["next_frame"]["mle"]["lpips"] == mle["model"]["per_step"]["lpips"][0]
    assert result["next_frame"]["copy_last"]["mse"] == mle["copy_last"]["per_step"]["mse"][0]
    assert set(result["next_frame"]) == {"copy_last", "copy_last_tokens", "tokenizer", "mle", "rlvr", "mle_greedy",
                                         "rlvr_greedy"}
    assert set(result["no_repeat"]) == {"mle", "rlvr"} and "model_no_repeat" in mle
    assert result["per_step"]["mle_no_repeat"] == mle["model_no_repeat"]["per_step"]
    assert len(result["per_step"]["rlvr_greedy"]["lpips"]) == 2
    model_config = json.loads((run_dir / "pretrain" / "model" / "config.json").read_text())
    assert model_config["copy_prior_offset"] == 4 + 2  # a 2x2 future frame and its 2 action dims
    rl_log = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert "reward_ssim" in rl_log[-1] and "reward_lpips" not in rl_log[-1]
    tokenizer = checkpoints.load_tokenizer(run_dir / "tokenizer.safetensors")
    assert isinstance(tokenizer, CompressiveTokenizer)
    assert (tokenizer.context_grid, tokenizer.future_grid) == ((4, 4), (2, 2))
    assert "the first predicted frame alone" in capsys.readouterr().out
