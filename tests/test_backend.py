"""Backend choice per call, the environment override, and the report for bug reports."""

import ast
from pathlib import Path

import pytest
import torch

import rlvrw.ops as ops
from rlvrw.ops import _backend

CPU = torch.device("cpu")


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve("grpo_loss", CPU) == "reference"


def test_explicit_backend_beats_the_environment(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("grpo_loss", CPU, "triton") == "triton"
    assert _backend.resolve("grpo_loss", CPU) == "reference"


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("token_logprobs", CPU) == "triton"


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="RLVRW_BACKEND must be one of"):
        ops.group_advantages(torch.randn(4), 2)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _backend.resolve("grpo_loss", CPU, "triton")


def test_no_test_module_turns_the_interpreter_on_unconditionally():
    """TRITON_INTERPRET=1 set at a module's import on a GPU machine makes every kernel defined after it run
    interpreted (and CPU-tensor tests pass there by accident): tests/conftest.py sets it only without CUDA, and a
    module that sets it too must do so under such a condition (an ``if`` at module level)."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*root.glob("tests/*.py"), *root.glob("bench/*.py")]):
        for stmt in ast.parse(path.read_text()).body:  # statements run at import, outside any if
            if isinstance(stmt, (ast.Expr, ast.Assign, ast.AugAssign)) and "TRITON_INTERPRET" in ast.unparse(stmt) \
                    and "environ" in ast.unparse(stmt):
                offenders.append(f"{path.relative_to(root)}:{stmt.lineno}")
    assert not offenders, offenders


def test_cuda_backend_errors_say_why(monkeypatch):
    with pytest.raises(ValueError, match="group_advantages has no CUDA version"):
        _backend.resolve("group_advantages", CPU, "cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.resolve("token_logprobs", CPU, "cuda")
    # forced through the environment, ops without a CUDA version fall back to Triton
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("group_advantages", CPU) == "triton"


def test_faster_times_once_and_caches():
    calls = []
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU to time candidates with CUDA events")
    choice = _backend.faster(("test", 1), {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")})
    assert choice in ("a", "b") and len(calls) == 8
    assert _backend.faster(("test", 1), {"a": lambda: calls.append("a")}) == choice and len(calls) == 8


def test_report_names_versions_and_device():
    info = ops.report()
    for key in ("rlvrw", "torch", "triton", "device", "cuda_extension", "cuda_available"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert "torch" in ops.format_report()


def test_size_class():
    assert [_backend.size_class(n) for n in (1, 2, 3, 4633, 4096)] == [1, 2, 4, 8192, 4096]
