"""Bad user input on the command line (rlvrw.usage): every case is exit code 2 and one line on stderr that names the
flag or config key and what was expected, never a traceback; RLVRW_DEBUG=1 shows the traceback; config values are
checked by type (a bool is true/false, numbers are finite) whether they come from a flag, a --config file or Python.

Each case here was a traceback, or a run that trained to NaN and exited 0, before these checks (issue 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLE_DATA
from rlvrw import usage
from rlvrw.cli import main
from rlvrw.usage import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Good inputs (a token cache, episodes, a tokenizer, frames) and bad ones (an empty file and directory, a plain
    file where a directory belongs, paths that do not exist), for the flags to point at."""
    from rlvrw.data import rt1
    from rlvrw.data import token_cache as TC
    from rlvrw.models.tokenizer_files import save_tokenizer
    from rlvrw.models.tokenizer import FrameTokenizer
    from rlvrw.train import pretrain as P

    root = tmp_path_factory.mktemp("usage")
    rng = np.random.default_rng(0)
    TC.save_token_cache(root / "tokens.npz", rng.integers(0, 16, (4, 8, 16)), rng.integers(0, 8, (4, 8, 2)),
                       codebook_size=16)
    for i in range(3):
        rt1.save_episode(root / "episodes" / f"ep{i}.npz", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
                         rng.normal(size=(6, 2)))
    save_tokenizer(FrameTokenizer(channels=(8, 8), layers_per_block=1, latent_channels=8, levels=(4, 4),
                                  num_groups=4), root / "tok.safetensors")
    np.savez(root / "frames.npz", image=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "empty_dir").mkdir()
    (root / "empty.npz").write_bytes(b"")
    (root / "a_file").write_text("not a directory")
    (root / "garbage.npz").write_bytes(b"not a zip archive")
    return {name: str(root / name) for name in ("tokens.npz", "episodes", "tok.safetensors", "frames.npz", "model",
                                                "empty_dir", "empty.npz", "a_file", "garbage.npz")} | {
        "missing": str(root / "missing"), "root": str(root)}


def config_file(inputs, name: str, text: str) -> str:
    path = Path(inputs["root"]) / f"{name}.json"
    path.write_text(text)
    return str(path)


def pretrain_args(inputs, *extra):
    return ["pretrain", "--data", inputs["tokens.npz"], "--out", inputs["root"] + "/run", *extra]


def rl_args(inputs, *extra):
    return ["rl", "--data", inputs["tokens.npz"], "--tokenizer", inputs["tok.safetensors"], "--out",
            inputs["root"] + "/rl", *extra]


def tokenizer_args(inputs, *extra):
    return ["tokenizer", "--frames", inputs["frames.npz"], "--steps", "1", *extra]


# (name, argv from the inputs, words the one error line must hold: the flag or key and what was wrong)
CASES = [
    ("pretrain missing --data", lambda i: ["pretrain", "--data", i["missing"]], ["data", "no such file"]),
    ("pretrain empty --data dir", lambda i: ["pretrain", "--data", i["empty_dir"]], ["data", "no *.npz"]),
    ("pretrain 0-byte --data", lambda i: ["pretrain", "--data", i["empty.npz"]], ["data", "empty"]),
    ("pretrain garbage --data", lambda i: ["pretrain", "--data", i["garbage.npz"], "--out", i["root"] + "/g"],
     ["garbage.npz", "no usable token cache file"]),
    ("pretrain --action-bins below the cache's", lambda i: pretrain_args(i, "--action-bins", "4"),
     ["action_bins holds ids up to 7", "[0, 4)"]),
    ("pretrain --context-frames longer than the episodes", lambda i: pretrain_args(i, "--context-frames", "20"),
     ["no episode of the token cache", "21 frames"]),
    ("pretrain missing --episodes",
     lambda i: ["pretrain", "--episodes", i["missing"], "--tokenizer", i["tok.safetensors"]], ["episodes", "no such"]),
    ("pretrain empty --episodes",
     lambda i: ["pretrain", "--episodes", i["empty_dir"], "--tokenizer", i["tok.safetensors"]],
     ["episodes", "no *.npz"]),
    ("pretrain missing --tokenizer",
     lambda i: ["pretrain", "--episodes", i["episodes"], "--tokenizer", i["missing"]], ["tokenizer", "no such file"]),
    ("pretrain missing --init-from", lambda i: pretrain_args(i, "--init-from", i["missing"]), ["init_from", "no such"]),
    ("pretrain empty --init-from", lambda i: pretrain_args(i, "--init-from", i["empty_dir"]),
     ["init_from", "config.json"]),
    ("pretrain --out on a file", lambda i: ["pretrain", "--data", i["tokens.npz"], "--out", i["a_file"]],
     ["out_dir", "existing file"]),
    ("pretrain negative --steps", lambda i: pretrain_args(i, "--steps", "-3"), ["steps", "positive"]),
    ("pretrain negative --micro-batch-size", lambda i: pretrain_args(i, "--micro-batch-size", "-1"),
     ["micro_batch_size", "positive"]),
    ("pretrain negative --frame-size",
     lambda i: ["pretrain", "--episodes", i["episodes"], "--tokenizer", i["tok.safetensors"], "--frame-size", "-4",
                "4"], ["frame_size"]),
    ("pretrain --lr inf", lambda i: pretrain_args(i, "--lr", "inf"), ["lr", "finite"]),
    ("pretrain --lr nan", lambda i: pretrain_args(i, "--lr", "nan"), ["lr", "finite"]),
    ("pretrain --weight-decay -inf", lambda i: pretrain_args(i, "--weight-decay=-inf"), ["weight_decay", "finite"]),
    ("config betas 5", lambda i: pretrain_args(i, "--config", config_file(i, "betas", '{"betas": 5}')),
     ["betas", "list of 2", "got 5"]),
    ("config lr Infinity", lambda i: pretrain_args(i, "--config", config_file(i, "lr", '{"lr": Infinity}')),
     ["lr", "finite", "inf"]),
    ("config weight_decay NaN",
     lambda i: pretrain_args(i, "--config", config_file(i, "wd", '{"weight_decay": NaN}')), ["weight_decay", "finite"]),
    ("config resume 'no'", lambda i: pretrain_args(i, "--config", config_file(i, "resume", '{"resume": "no"}')),
     ["resume", "true or false", "'no'"]),
    ("config steps '3'", lambda i: ["pretrain", "--data", i["tokens.npz"], "--config",
                                   config_file(i, "steps", '{"steps": "3"}')], ["steps", "an int", "'3'"]),
    ("config compile 1", lambda i: pretrain_args(i, "--config", config_file(i, "compile", '{"compile": 1}')),
     ["compile", "true or false"]),
    ("config unknown key", lambda i: pretrain_args(i, "--config", config_file(i, "unknown", '{"lrr": 1}')),
     ["unknown keys", "lrr"]),
    ("config not JSON", lambda i: pretrain_args(i, "--config", config_file(i, "broken", "{steps: 3")),
     ["--config", "not valid JSON"]),
    ("config missing file", lambda i: pretrain_args(i, "--config", i["missing"]), ["--config", "no such file"]),
    ("config model_overrides NaN",
     lambda i: pretrain_args(i, "--config", config_file(i, "mo", '{"model_overrides": {"rope_theta": NaN}}')),
     ["model_overrides", "finite"]),
    ("rl missing --data", lambda i: ["rl", "--data", i["missing"], "--tokenizer", i["tok.safetensors"]],
     ["data", "no such file"]),
    ("rl empty --tokenizer", lambda i: ["rl", "--data", i["tokens.npz"], "--tokenizer", i["empty.npz"]],
     ["tokenizer", "empty"]),
    ("rl missing --init-from", lambda i: rl_args(i, "--init-from", i["missing"]), ["init_from", "no such"]),
    ("rl --out on a file", lambda i: ["rl", "--data", i["tokens.npz"], "--tokenizer", i["tok.safetensors"], "--out",
                                      i["a_file"]], ["out_dir", "existing file"]),
    ("rl --lr inf", lambda i: rl_args(i, "--lr", "inf"), ["lr", "finite"]),
    ("rl --token-grid that does not fit", lambda i: rl_args(i, "--token-grid", "3", "3"),
     ["token grid (3, 3) does not hold the layout's 16 frame tokens"]),
    ("rl --kl-coef inf", lambda i: rl_args(i, "--kl-coef", "inf"), ["kl_coef", "finite"]),
    ("rl --temperature nan", lambda i: rl_args(i, "--temperature", "nan"), ["temperature", "finite"]),
    ("rl negative --group-size", lambda i: rl_args(i, "--group-size", "-2"), ["group_size", "positive"]),
    ("rl negative --token-grid", lambda i: rl_args(i, "--token-grid", "-4", "4"), ["token_grid"]),
    ("eval missing --model", lambda i: ["eval", "--model", i["missing"], "--tokenizer", i["tok.safetensors"],
                                        "--episodes", i["episodes"]], ["model", "no such directory"]),
    ("eval empty --episodes", lambda i: ["eval", "--model", i["model"], "--tokenizer", i["tok.safetensors"],
                                         "--episodes", i["empty_dir"]], ["episodes", "no *.npz"]),
    ("eval --model without config.json", lambda i: ["eval", "--model", i["empty_dir"], "--tokenizer",
                                                    i["tok.safetensors"], "--episodes", i["episodes"]],
     ["model", "config.json"]),
    ("eval --out on a file", lambda i: ["eval", "--model", i["model"], "--tokenizer", i["tok.safetensors"],
                                        "--episodes", i["episodes"], "--out", i["a_file"]],
     ["out_dir", "existing file"]),
    ("tokenizer missing --frames", lambda i: ["tokenizer", "--frames", i["missing"]], ["frames", "no such file"]),
    ("tokenizer 0-byte --frames", lambda i: ["tokenizer", "--frames", i["empty.npz"]], ["frames", "empty"]),
    ("tokenizer --frames not an npz", lambda i: ["tokenizer", "--frames", i["a_file"]], ["frames", "cannot be read"]),
    ("tokenizer wrong --key", lambda i: tokenizer_args(i, "--key", "frames"), ["--key", "'frames'"]),
    ("tokenizer negative --steps", lambda i: tokenizer_args(i, "--steps", "-1"), ["steps", "positive int"]),
    ("tokenizer negative --batch-size", lambda i: tokenizer_args(i, "--batch-size", "-1"), ["batch_size"]),
    ("tokenizer negative --size", lambda i: tokenizer_args(i, "--size", "-4", "4"), ["--size", "positive"]),
    ("tokenizer --lr inf", lambda i: tokenizer_args(i, "--lr", "inf"), ["lr", "finite"]),
    ("tokenizer --out on a directory", lambda i: tokenizer_args(i, "--out", i["empty_dir"]), ["--out", "directory"]),
    ("tokenizer bad --device", lambda i: tokenizer_args(i, "--device", "tpu9"), ["--device"]),
    ("tokenizer negative --channels", lambda i: tokenizer_args(i, "--size", "16", "16", "--channels", "-8", "8"),
     ["--channels"]),
    ("data check missing root", lambda i: ["data", "check", i["missing"]], ["root", "no such directory"]),
    ("data check empty root", lambda i: ["data", "check", i["empty_dir"]], ["root", "no episode files"]),
    ("data frames missing root", lambda i: ["data", "frames", i["missing"], i["root"] + "/f.npz"], ["root"]),
    ("data frames out on a directory", lambda i: ["data", "frames", i["episodes"], i["empty_dir"]],
     ["out", "directory"]),
    ("data generate negative --episodes", lambda i: ["data", "generate", "--episodes", "-1", "--out", i["missing"]],
     ["episodes", ">= 2"]),
    ("data generate --out on a file", lambda i: ["data", "generate", "--out", i["a_file"]], ["out_dir", "file"]),
    ("train unknown setting", lambda i: ["train", "--run-dir", i["missing"], "lrr=1"], ["unknown settings", "lrr"]),
    ("train rl_lr Infinity", lambda i: ["train", "--run-dir", i["missing"], "rl_lr=Infinity"], ["rl_lr", "finite"]),
    ("train progress 'no'", lambda i: ["train", "--run-dir", i["missing"], "progress=no"],
     ["progress", "true or false"]),
    ("pretrain unknown flag", lambda i: pretrain_args(i, "--learning-rate", "1"), ["unrecognized", "--learning-rate"]),
    ("pretrain --steps not an int", lambda i: pretrain_args(i, "--steps", "ten"), ["--steps", "invalid int"]),
    ("pretrain --model-overrides not JSON", lambda i: pretrain_args(i, "--model-overrides", "{bad"),
     ["--model-overrides"]),
    ("train --run-dir on a file", lambda i: ["train", "--run-dir", i["a_file"]], ["--run-dir", "existing file"]),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_exit_2(inputs, capsys, name, argv, words):
    try:
        code = main(argv(inputs))
    except SystemExit as exit:  # argparse's own errors (a flag it cannot parse) exit from inside it
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("rlvrw") and ": error: " in line, line
    for word in words:
        assert word in line, (word, line)
    assert "Traceback" not in line


def run_rlvrw(*argv, env=None, prelude=""):
    """``rlvrw ARGV`` in a fresh process, ``prelude`` (Python) run first, RLVRW_DEBUG unset unless ``env`` sets it."""
    code = f"{prelude}\nimport sys\nfrom rlvrw.cli import main\nsys.exit(main(sys.argv[1:]))"
    environment = {**{k: v for k, v in os.environ.items() if k != "RLVRW_DEBUG"}, **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=environment,
                          cwd=ROOT, timeout=300, check=False)


def test_a_real_process_prints_one_line_and_exits_2(inputs):
    result = subprocess.run([sys.executable, "-m", "rlvrw", "pretrain", "--data", inputs["tokens.npz"], "--lr", "inf",
                             "--out", inputs["a_file"]], capture_output=True, text=True, timeout=300, check=False,
                            env={k: v for k, v in os.environ.items() if k != "RLVRW_DEBUG"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["rlvrw pretrain: error: lr must be a finite number, got inf"]


def test_debug_shows_the_traceback(inputs):
    result = run_rlvrw("pretrain", "--data", inputs["missing"], env={"RLVRW_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "UsageError" in result.stderr


@pytest.fixture
def one_record(tmp_path) -> Path:
    sample = EXAMPLE_DATA / "text_game" / "bytesized32_train_sample.jsonl"
    data = tmp_path / "records.jsonl"
    data.write_text(sample.read_text().splitlines()[0] + "\n")
    return data


def test_missing_peft_names_the_extra(tmp_path, one_record):
    """`rlvrw lang sft` trains LoRA adapters by default: without peft, one line naming the extra (it was a
    ModuleNotFoundError traceback)."""
    pytest.importorskip("transformers")
    (tmp_path / "model").mkdir()
    result = run_rlvrw("lang", "sft", "--task", "text_game", "--data", str(one_record), "--model",
                       str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                       prelude="import sys; sys.modules['peft'] = None")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "rlvrw lang sft: error: LoRA training (lora; full fine-tuning, `--no-lora`, does not) needs peft (pip install "
        "peft, or rlvrw[lang])")
    assert "Traceback" not in result.stderr


def test_missing_transformers_names_the_extra(tmp_path, one_record):
    result = run_rlvrw("lang", "make-tiny", "--task", "text_game", "--data", str(one_record), "--out",
                       str(tmp_path / "tiny"), prelude="import sys; sys.modules['transformers'] = None")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "rlvrw lang make-tiny: error: rlvrw.lang's language models needs transformers (pip install transformers, or "
        "rlvrw[lang])")
    assert "Traceback" not in result.stderr


LANG_CASES = [
    ("sft --lr inf", lambda d, t: ["sft", "--model", t, "--out", t + "/o", "--lr", "inf"], ["lr", "inf"]),
    ("sft missing --model", lambda d, t: ["sft", "--model", t + "/none", "--out", t + "/o"], ["model", "directory"]),
    ("sft --on-nonfinite bad", lambda d, t: ["sft", "--model", t, "--out", t + "/o", "--on-nonfinite", "x"],
     ["--on-nonfinite", "invalid choice"]),
    ("rl --temperature nan", lambda d, t: ["rl", "--model", t, "--out", t + "/o", "--temperature", "nan"],
     ["temperature"]),
    ("rl --group-size 1", lambda d, t: ["rl", "--model", t, "--out", t + "/o", "--group-size", "1"],
     ["group_size", ">= 2"]),
    ("eval missing --responses", lambda d, t: ["eval", "--responses", t + "/none.jsonl"], ["--responses", "no such"]),
    ("eval --responses of another length", lambda d, t: ["eval", "--responses", write(t, "r.jsonl", '"a"\n"b"\n')],
     ["--responses", "2 responses for 1 records"]),
    ("eval --responses not JSON", lambda d, t: ["eval", "--responses", write(t, "bad.jsonl", "{oops\n")],
     ["--responses", "line 1 is not JSON"]),
    ("eval missing --model", lambda d, t: ["eval", "--model", t + "/none"], ["--model", "no such directory"]),
    ("eval --out on a directory", lambda d, t: ["eval", "--gold", "--out", t], ["--out", "directory"]),
    ("make-tiny negative --hidden-size", lambda d, t: ["make-tiny", "--out", t + "/tiny", "--hidden-size", "-1"],
     ["--hidden-size", "positive"]),
    ("make-tiny --out on a file", lambda d, t: ["make-tiny", "--out", str(d)], ["--out", "existing file"]),
    ("missing --data", lambda d, t: ["eval", "--gold", "--data", t + "/none.jsonl"], ["--data", "existing file"]),
]


def write(folder: str, name: str, text: str) -> str:
    (Path(folder) / name).write_text(text)
    return str(Path(folder) / name)


@pytest.mark.parametrize("name, argv, words", LANG_CASES, ids=[case[0] for case in LANG_CASES])
def test_lang_bad_input_is_one_line_and_exit_2(one_record, tmp_path, capsys, name, argv, words):
    args = argv(one_record, str(tmp_path))
    command = ["lang", args[0], "--task", "text_game", "--data", str(one_record), *args[1:]]
    try:
        code = main(command)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and err[0].startswith("rlvrw lang"), err
    for word in words:
        assert word in err[0], (word, err[0])


def test_require_names_the_extra_and_keeps_real_import_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "rlvrw_no_such_package", None)
    with pytest.raises(usage.MissingDependencyError,
                       match=r"the demo needs nspkg \(pip install nspkg, or rlvrw\[x\]\)"):
        usage.require("rlvrw_no_such_package", "the demo", "nspkg", "x")
    assert usage.require("json", "json", "json") is json


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    from rlvrw import cli

    def buggy(args):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(cli, "_report", buggy)
    with pytest.raises(ValueError, match="a bug"):
        main(["report"])


# ---- typed configs ---------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    flag: bool = False
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    pair: tuple[float, float] = (0.9, 0.99)
    grid: tuple[int, int] | None = None
    extra: dict | None = None


@pytest.mark.parametrize("field, value, words", [
    ("flag", "no", "flag must be true or false"),
    ("flag", 1, "flag must be true or false"),
    ("count", True, "count must be an int"),
    ("count", 2.0, "count must be an int"),
    ("count", "3", "count must be an int"),
    ("rate", float("inf"), "rate must be a finite number"),
    ("rate", float("nan"), "rate must be a finite number"),
    ("rate", "0.1", "rate must be a finite number"),
    ("rate", False, "rate must be a finite number"),
    ("name", 3, "name must be a string"),
    ("pair", 5, "pair must be a list of 2"),
    ("pair", [0.9], "pair must be a list of 2"),
    ("pair", [0.9, float("nan")], "pair must be a list of 2"),
    ("grid", [4, "4"], "grid must be a list of 2 (an int, an int) or null"),
    ("extra", {"a": [1.0, float("inf")]}, "extra must hold finite numbers"),
])
def test_check_types_names_the_field(field, value, words):
    settings = Settings(**{field: value})
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        usage.check_types(settings)


def test_check_types_accepts_good_values():
    usage.check_types(Settings(flag=True, count=3, rate=2, pair=[0.5, 1], grid=(2, 3), extra={"a": 1.5}))


@pytest.mark.parametrize("module, cls, values", [
    ("rlvrw.train.pretrain", "PretrainConfig", {"data": "x", "lr": float("inf")}),
    ("rlvrw.train.pretrain", "PretrainConfig", {"data": "x", "resume": "no"}),
    ("rlvrw.train.trainer", "RLConfig", {"lr": float("nan")}),
    ("rlvrw.train.trainer", "RLConfig", {"betas": 5}),
    ("rlvrw.train.evaluate", "EvalConfig", {"temperature": float("inf")}),
    ("rlvrw.train.pipeline", "PipelineConfig", {"rl_lr": float("inf")}),
    ("rlvrw.models.tokenizer_train", "TrainConfig", {"lr": float("inf")}),
    ("rlvrw.models.tokenizer_train", "TrainConfig", {"on_nonfinite": "ignore"}),
])
def test_configs_refuse_bad_types_from_python_too(module, cls, values):
    import importlib

    config_cls = getattr(importlib.import_module(module), cls)
    with pytest.raises(UsageError, match=next(iter(set(values) - {"data"}))):
        config_cls(**values)
