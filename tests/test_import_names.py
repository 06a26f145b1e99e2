"""No import name of ours shadows another package when Python runs from the repository root.

``python3 -m pytest`` and ``python3 -m rlvrw`` put the checkout's root first on ``sys.path``. The top-level
``kernels/`` folder (installed as ``rlvrw.kernels``) must then never answer ``import kernels``: transformers imports
Hugging Face's ``kernels`` package by that name, and a release of it once broke our fresh-clone test run.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str, extra_path: str | None = None, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    # `python -c` puts the working directory first on sys.path, as `python -m` does
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_top_level_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package that shadows Hugging Face's `kernels`")


def test_another_kernels_package_wins_over_ours(tmp_path):
    stub = tmp_path / "kernels"
    stub.mkdir()
    (stub / "__init__.py").write_text("MARK = 'the other kernels package'\n")
    proc = run_from_root(
        "import kernels; assert kernels.MARK == 'the other kernels package', kernels.__path__\n"
        "from rlvrw.kernels import grpo_loss, logprobs, fsq, group_norm_silu, lpips_tail\n"
        "print('ok')\n",
        str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_alone_our_folder_is_only_a_namespace_portion():
    # With no site-packages at all, `import kernels` from the root finds our folder only as a namespace package:
    # no __file__, which is how transformers tells a stray folder from an installed package.
    proc = run_from_root("import kernels; print(getattr(kernels, '__file__', None))", None, "-S")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_hub_kernels_imports_from_the_root(tmp_path):
    code = "import transformers.integrations.hub_kernels; print('ok')"
    elsewhere = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if elsewhere.returncode != 0:
        pytest.skip("transformers' hub_kernels does not import even away from the checkout (the installed transformers "
                    "and Hugging Face kernels do not fit together): " + elsewhere.stderr.strip().splitlines()[-1])
    proc = run_from_root(code + "; import rlvrw.ops")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
