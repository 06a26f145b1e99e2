"""The integrations' import rules: ``rlvrw.ops`` imports no framework; each integration module imports only
``rlvrw.ops`` / ``rlvrw.reference`` (and helpers of its own package) besides its framework, nothing else of rlvrw
imports an integration; the torch-only modules import with every framework hidden, and the others then say which
framework and extra they need."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTEGRATIONS = ROOT / "rlvrw" / "integrations"
FRAMEWORKS = ("verl", "trl", "liger_kernel", "openrlhf", "accelerate", "transformers", "datasets", "peft", "ray")
ALLOWED = {  # top-level packages each module may import, besides the standard library, torch, and rlvrw's own
    "verl": {"verl"}, "trl": {"trl", "accelerate"}, "liger": set(), "openrlhf": set(), "_trl_options": set(),
    "__init__": set(),
}
# the ops, their reference and the base layer's public input checks (docs/architecture.md)
OURS = {"rlvrw", "rlvrw.ops", "rlvrw.reference", "rlvrw.checks", "rlvrw.integrations", "rlvrw.integrations._trl_options"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            if node.module == "rlvrw":
                names.update(f"rlvrw.{alias.name}" for alias in node.names)
    return names


def test_each_integration_imports_only_the_ops_and_its_framework():
    modules = {path.stem: path for path in INTEGRATIONS.glob("*.py")}
    assert set(modules) == set(ALLOWED)
    for name, path in modules.items():
        for imported in imports(path):
            top = imported.split(".")[0]
            if top == "rlvrw":
                assert imported in OURS, f"{path.name} imports {imported}: integrations sit on rlvrw.ops only"
            elif top in sys.stdlib_module_names or top in ("torch", "__future__"):
                continue
            else:
                assert top in ALLOWED[name], f"{path.name} imports {imported}"


def test_nothing_of_rlvrw_imports_the_integrations():
    for path in (ROOT / "rlvrw").rglob("*.py"):
        if INTEGRATIONS not in path.parents:
            assert not any(name.startswith("rlvrw.integrations") for name in imports(path)), path


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_importing_the_ops_imports_no_framework():
    run_ = run(f"import sys, rlvrw.ops\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r} "
               "or m.startswith('rlvrw.integrations')))")
    assert run_.returncode == 0, run_.stderr
    assert run_.stdout.strip() == "[]", run_.stdout


def test_integrations_without_their_frameworks():
    code = f"""
import sys
for name in {FRAMEWORKS!r}:
    sys.modules[name] = None
import torch
from rlvrw.integrations.liger import LigerFusedLinearGRPOLoss
from rlvrw.integrations.openrlhf import PolicyLoss
loss = PolicyLoss()(torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))[0]
loss.backward()
for module, extra in (("verl", "verl"), ("trl", "trl")):
    try:
        __import__("rlvrw.integrations." + module)
    except ImportError as exc:
        assert "pip install rlvrw[" + extra + "]" in str(exc), exc
        print(module, "refused")
    else:
        raise AssertionError(module + " imported without its framework")
"""
    result = run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["verl", "refused", "trl", "refused"]
