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
