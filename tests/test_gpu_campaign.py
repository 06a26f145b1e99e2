"""bench/gpu_campaign.sh without a GPU: its dry run lists the stages and finds every test file, test id and benchmark
they name (and reports one that is missing); a stage whose budget no longer fits is skipped and says so; a bench
stage on CPU ends in the merged pytest-benchmark JSON and markdown in $OUT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_campaign.sh"
STAGES = ["setup", "sync-graph", "gpu-tests", "bench-grpo", "bench-linear", "bench-rl-step", "selfcheck",
          "bench-reward", "bench-decode", "bench-fsq", "bench-group-norm", "kernel-tests"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the campaign script needs bash and coreutils' timeout")


def campaign(*args: str, script: Path = SCRIPT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env}, cwd=script.parents[1])


def test_dry_run_lists_the_stages_and_finds_everything_they_name():
    proc = campaign("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line and line.split()[0] in STAGES]
    assert listed == STAGES
    assert "test_train_step_has_no_host_sync" in proc.stdout and "test_cuda_graph_rollout" in proc.stdout
    assert "test_grpo_loss_from_logits[video-liger]" in proc.stdout
    assert "missing" not in proc.stdout and "checked" in proc.stdout


def test_dry_run_reports_a_name_that_does_not_exist(tmp_path):
    """A copy of the script naming a test and a benchmark that do not exist, beside links to the real tests."""
    (tmp_path / "bench").mkdir()
    for item in (REPO / "bench").iterdir():
        if item.name != "gpu_campaign.sh":
            (tmp_path / "bench" / item.name).symlink_to(item)
    for name in ("tests", "rlvrw", "kernels", "pyproject.toml"):
        (tmp_path / name).symlink_to(REPO / name)
    text = SCRIPT.read_text()
    text = text.replace("tests/test_rollout.py::test_cuda_graph_rollout", "tests/test_rollout.py::test_no_such_test")
    grpo_impls = '"rlvrw rlvrw-triton rlvrw-cuda eager liger"'
    text = text.replace(grpo_impls, grpo_impls.replace('"rlvrw', '"nope rlvrw'))
    script = tmp_path / "bench" / "gpu_campaign.sh"
    script.write_text(text)
    proc = campaign("--dry-run", "--only", "sync-graph,bench-grpo", script=script,
                    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    missing = proc.stdout.split("missing:")[1]
    assert "tests/test_rollout.py::test_no_such_test: not a collected gpu-marked test" in missing
    assert "bench/test_bench_grpo.py::test_grpo_loss_from_logits[lm-nope]: not collected" in missing
    assert missing.count(": not") == 3  # [lm-nope] and [video-nope] too, nothing else


def test_unknown_stage_or_argument():
    assert campaign("--only", "bench-gpro").returncode == 2
    assert campaign("--frobnicate").returncode == 2


def test_a_stage_that_would_overrun_is_skipped_and_says_so(tmp_path):
    proc = campaign("--only", "bench-fsq", OUT=str(tmp_path), CAMPAIGN_SECONDS="40")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.split("== summary")[1]
    assert "bench-fsq         SKIPPED: would overrun (budget 25s" in summary
    assert "report            no benchmark JSON" in summary
    assert "bench-fsq         SKIPPED: would overrun" in (tmp_path / "campaign.log").read_text()
    assert json.loads((tmp_path / "campaign-env.json").read_text())["packages"]["torch"]


def test_a_bench_stage_on_cpu_ends_in_the_report(tmp_path):
    proc = campaign("--only", "bench-fsq", OUT=str(tmp_path), CAMPAIGN_SECONDS="600", CAMPAIGN_BUDGET_SCALE="10",
                    RLVRW_BENCH_ROUNDS="1")  # budgets are a GPU's: a shared CPU may need ten times as long
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bench-fsq         ok in" in proc.stdout.split("== summary")[1]
    results = sorted(p.name for p in tmp_path.iterdir())
    stem = next(name[:-3] for name in results if name.endswith(".md") and name.startswith("cpu-"))
    assert results == sorted(["campaign.log", "campaign-env.json", stem + ".json", stem + ".md"])
    run = json.loads((tmp_path / f"{stem}.json").read_text())
    assert {b["group"].split(":")[0] for b in run["benchmarks"]} == {"fsq_quantize", "fsq_dequantize"}
    assert all(b["stats"]["rounds"] == 1 for b in run["benchmarks"])
    assert any("needs a CUDA device" in s["reason"] for s in run["rlvrw_skipped"])
