"""``rlvrw experiment``: the three Fig. 4 parts end to end on the smoke preset (JSON with every seed and their mean,
PNG plots), the markdown report, and the README's results block equal to the report of the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlvrw.train import experiment as E

ROOT = Path(__file__).resolve().parents[1]


def test_mean_over_seeds_and_relative_gain():
    per_seed = {"0": {"a": {"lpips": 1.0}}, "1": {"a": {"lpips": 3.0}}}
    assert E.mean_over_seeds(per_seed) == {"a": {"lpips": 2.0}}
    assert E.relative_gain({"lpips": 0.9}, {"lpips": 1.0}, "lpips") == pytest.approx(10.0)
    assert E.relative_gain({"psnr": 22.0}, {"psnr": 20.0}, "psnr") == pytest.approx(10.0)


def test_smoke_experiment_writes_every_part(tmp_path, monkeypatch):
    pytest.importorskip("gym_pusht")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("RLVRW_CACHE", str(tmp_path / "cache"))
    # fewer runs than the real experiment: two rewards (one is the pipeline's own run), two group sizes, N up to 4
    monkeypatch.setattr(E, "REWARDS", ("ssim", "l1+lpips"))
    monkeypatch.setattr(E, "GROUP_SIZES", (2, 4))
    monkeypatch.setattr(E, "BEST_OF", 4)
    out = tmp_path / "out"
    assert E.main(["run", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--seeds", "0",
                   "--parts", "metrics", "group_size", "best_of_n", "--",
                   "preset=smoke", "lpips_weights=random"]) == 0
    for part in ("default", *E.PARTS):
        result = json.loads((out / f"{part}.json").read_text())
        assert result["seeds"] == [0] and result["mean"] == result["per_seed"]["0"]
        assert (out / f"{part}.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())["mean"]
    assert set(metrics) == {"mle", *E.REWARDS} and set(metrics["ssim"]) == set(E.TABLE_METRICS)
    assert list(json.loads((out / "best_of_n.json").read_text())["mean"]["rlvr"]) == ["1", "2", "4"]
    assert set(json.loads((out / "group_size.json").read_text())["mean"]) == {"mle", "2", "4"}
    block = E.report(out)
    assert block.startswith(E.BEGIN) and block.endswith(E.END) and "| l1+lpips |" in block


def test_report_rewrites_and_checks_a_readme(tmp_path):
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    rows = {name: {m: 0.1 for m in E.TABLE_METRICS} for name in ("copy_last", "tokenizer", "mle", "rlvr")}
    (results / "default.json").write_text(json.dumps({"seeds": [0], "clips": 9, "per_seed": {"0": rows},
                                                      "mean": rows}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{E.BEGIN}\nold\n{E.END}\n\ntail\n")
    assert E.main(["report", "--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert E.main(["report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n" + E.BEGIN) and text.endswith(E.END + "\n\ntail\n") and "old" not in text
    assert "| copy_last | 0.1 |" in text
    assert E.main(["report", "--results", str(results), "--readme", str(readme), "--check"]) == 0
    with pytest.raises(ValueError, match="results:begin"):
        E.replace_block("no markers", "block")


def test_multistep_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = {name: {"lpips": [0.01 * i, 0.02 * i, 0.03 * i], "repetition_rate": 0.1 * i}
            for i, name in enumerate(E.MULTISTEP_ROWS, 1)}
    result = {"part": "multistep", "seeds": [0, 1], "clips": None, "per_seed": {"0": rows, "1": rows}, "mean": rows}
    (tmp_path / "multistep.json").write_text(json.dumps(result))
    E.plot("multistep", result, tmp_path / "multistep.png")
    assert (tmp_path / "multistep.png").stat().st_size > 1000
    block = E.report(tmp_path)
    assert "| t = 1 | t = 2 | t = 3 | mean | repetition |" in block
    assert "| mle_no_repeat | 0.04 | 0.08 | 0.12 | 0.08 | 40.0% |" in block
    assert E.mean_over_seeds({"0": {"a": [1.0, 2.0]}, "1": {"a": [3.0, 4.0]}}) == {"a": [2.0, 3.0]}


def test_report_shows_every_seed_beside_the_mean(tmp_path):
    """With two seeds, the Fig. 4 tables show each seed's LPIPS, so a claim is seen to hold on each seed."""
    per_seed = {s: {name: {m: v + 0.1 * int(s) for m in E.TABLE_METRICS}
                    for name, v in (("mle", 0.5), ("4", 0.4), ("8", 0.3))} for s in ("0", "1")}
    mean = E.mean_over_seeds(per_seed)
    (tmp_path / "group_size.json").write_text(json.dumps({"seeds": [0, 1], "per_seed": per_seed, "mean": mean}))
    curve = {s: {m: {n: {"lpips": 0.1 * int(n) + int(s)} for n in ("1", "2")} for m in ("mle", "rlvr")}
             for s in ("0", "1")}
    (tmp_path / "best_of_n.json").write_text(json.dumps({"seeds": [0, 1], "per_seed": curve,
                                                          "mean": E.mean_over_seeds(curve)}))
    steps = {s: {name: {"lpips": [0.1 + int(s), 0.2], "repetition_rate": 0.5 * int(s)} for name in ("mle", "rlvr")}
             for s in ("0", "1")}
    (tmp_path / "multistep.json").write_text(json.dumps({"seeds": [0, 1], "per_seed": steps,
                                                          "mean": E.mean_over_seeds(steps)}))
    block = E.report(tmp_path)
    assert "| model | mae | lpips | lpips seed 0 | lpips seed 1 |" in block
    assert ("| row | t = 1 | t = 2 | mean | repetition | mean seed 0 | repetition seed 0 | mean seed 1 | "
            "repetition seed 1 |") in block
    assert "| rlvr | 0.6 | 0.2 | 0.4 | 25.0% | 0.15 | 0.0% | 0.65 | 50.0% |" in block
    assert "| G = 4 | 0.45 | 0.45 | 0.4 | 0.5 |" in block
    assert "| RLVR seed 1 | 1.1 | 1.2 |" in block


def test_readme_results_block_is_the_reports_output():
    """The README's result tables are what `rlvrw experiment report` makes from the committed JSON results."""
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(E.BEGIN), readme.index(E.END) + len(E.END)
    assert readme[start:end] == E.report(ROOT / "docs" / "results", "docs/results/")


def test_bad_arguments_exit_2(capsys):
    assert E.main(["run", "--parts", "nope"]) == 2
    assert "--parts" in capsys.readouterr().err
    assert E.main(["run", "bogus=1"]) == 2
    assert "unknown settings" in capsys.readouterr().err
    # settings written after --parts are settings, not parts (argparse hands them to --parts' nargs="*")
    assert E.main(["run", "--parts", "multistep", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown settings" in err and "--parts" not in err
