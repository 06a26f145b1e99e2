"""The README's examples run as written from a clone alone: the API tour, and the language demo's commands on the
samples in examples/data. Both run in a copy of the checkout (the files git would clone) with nothing beside it, so
a path outside the clone (the project's ../shared) would fail here."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the checkout's files as a clone has them, alone in a fresh folder."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: the file list of a clone is unknown")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    target = tmp_path_factory.mktemp("readme") / "rlvrw"
    for name in filter(None, out.decode().split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    assert not (target.parent / "shared").exists()
    return target


def run_in(clone: Path, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(args, cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_points_only_inside_the_repository():
    text = README.read_text()
    assert "../shared" not in text
    paths = set(re.findall(r"\bexamples/[\w./-]*\w", text))
    assert paths, "the README names no example data"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"the README names paths the repository lacks: {missing}"


def test_api_tour_runs_from_a_clone(clone):
    python = blocks("python")
    assert python, "README.md has no python snippets"
    for i, block in enumerate(python):
        script = clone / f"readme_block_{i}.py"
        script.write_text(block)
        run = run_in(clone, [sys.executable, script.name], timeout=600)
        assert run.returncode == 0, f"README python block {i} failed:\n{block}\n{run.stdout}\n{run.stderr}"


def test_language_demo_runs_from_a_clone(clone):
    (demo,) = [b for b in blocks("bash") if "rlvrw lang" in b]
    assert "examples/data/" in demo
    # `rlvrw` as the clone's own module (python -m rlvrw runs the package found first: the clone's)
    script = 'set -euo pipefail\nrlvrw() { "$PYTHON" -m rlvrw "$@"; }\n' + demo
    run = run_in(clone, ["bash", "-c", script], timeout=1200)
    assert run.returncode == 0, f"the language demo failed:\n{run.stdout}\n{run.stderr}"
    assert (clone / "runs" / "rl" / "model").is_dir()
    assert "64 records" in run.stdout
    # the web sample scored against its own gold answers: every item parses and matches
    assert re.search(r"^f1\s+1\.0000$", run.stdout, re.M) and re.search(r"^unparseable: 0$", run.stdout, re.M)


INTEGRATIONS = "Use it from VERL / TRL / OpenRLHF"

VERL_CONFIG_CHECK = """
import os, sys
import torch
import verl
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.import_utils import import_external_libs

overrides = sys.argv[1:] + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]  # the rest of a real run
with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                           version_base=None):
    config = compose(config_name="ppo_trainer", overrides=overrides)
import_external_libs(config.actor_rollout_ref.model.external_lib)  # what each VERL worker does
actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
loss_fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
assert loss_fn.__module__.startswith("rlvrw.integrations.verl"), loss_fn
assert sys.modules["rlvrw"].__file__.startswith(os.getcwd()), "not the clone's rlvrw"
g = torch.Generator().manual_seed(0)
old, logp = -torch.rand(3, 5, generator=g, dtype=torch.float64), -torch.rand(3, 5, generator=g, dtype=torch.float64)
mask = torch.ones(3, 5, dtype=torch.bool)
mask[1] = False
adv = torch.randn(3, 1, generator=g, dtype=torch.float64) * mask
args = dict(old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=actor.loss_agg_mode, config=actor)
loss, metrics = loss_fn(log_prob=logp, **args)
expected, expected_metrics = get_policy_loss_fn("vanilla")(log_prob=logp, **args)
torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-10)
assert metrics.keys() == expected_metrics.keys()
print("verl config ok:", actor.policy_loss.loss_mode)
"""


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_integration_snippets_are_there():
    """One snippet per framework: a class swap for TRL, OpenRLHF and Liger (their python blocks run with the API
    tour's, above), two settings for VERL (run below)."""
    text = section(INTEGRATIONS)
    python = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    for module in ("trl", "openrlhf", "liger"):
        assert sum(f"from rlvrw.integrations.{module} import" in block for block in python) == 1, module
    assert all(block in blocks("python") for block in python)
    (verl,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "external_lib=rlvrw.integrations.verl" in verl and "loss_mode=rlvrw_grpo" in verl


def test_verl_settings_select_the_loss(clone):
    """The README's VERL settings, composed into VERL's own trainer config as Hydra does for main_ppo, make VERL's
    workers pick rlvrw's loss from the clone."""
    pytest.importorskip("verl")
    pytest.importorskip("hydra")
    (verl,) = re.findall(r"```bash\n(.*?)```", section(INTEGRATIONS), flags=re.S)
    overrides = re.findall(r"(?<!\S)([\w.]+=\S+)", verl)
    assert len(overrides) == 2, overrides
    (clone / "readme_verl_config.py").write_text(VERL_CONFIG_CHECK)
    run = run_in(clone, [sys.executable, "readme_verl_config.py", *overrides], timeout=600)
    assert run.returncode == 0 and "verl config ok: rlvrw_grpo" in run.stdout, run.stdout + run.stderr[-3000:]
