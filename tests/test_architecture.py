"""The house rules of docs/architecture.md, checked on the code as it is: every rlvrw module (and every Triton
kernel file, installed as ``rlvrw.kernels``) imports only its own layer and the layers its row allows, there is no
import circle, and no source file is longer than 600 lines. The rules live once, in ``MAY_IMPORT`` below; the doc's
table is compared with it, so the doc cannot drift from what is enforced.

Imports are read from the source (``ast``), every one of them, including those inside functions: a lazy import is
still a dependency of the module that makes it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 600

# Layers, lowest first: the modules (or packages) each holds.
LAYERS = {
    "base": ("rlvrw", "rlvrw.usage", "rlvrw.files", "rlvrw.checks", "rlvrw.weights", "rlvrw.guard"),
    "kernels": ("rlvrw.kernels", "rlvrw._nvrtc_source", "rlvrw._C_cupy", "rlvrw._C_loader"),
    "reference": ("rlvrw.reference",),
    "ops": ("rlvrw.ops",),
    "models": ("rlvrw.models",),
    "data": ("rlvrw.data",),
    "eval": ("rlvrw.eval",),
    "train": ("rlvrw.train", "rlvrw.rl"),
    "lang": ("rlvrw.lang",),
    "integrations": ("rlvrw.integrations",),
    "entry": ("rlvrw.cli", "rlvrw.__main__", "rlvrw.selfcheck"),
}

# What each layer may import besides itself. Nothing points up, and the two libraries at the top of the kernel half
# (integrations for other trainers, models for ours) see ops, never each other.
MAY_IMPORT = {
    "base": (),
    "kernels": ("base",),
    "reference": ("base",),
    "ops": ("base", "kernels", "reference"),
    "models": ("base", "reference", "ops"),
    "data": ("base",),
    "eval": ("base", "reference", "ops", "models"),
    "train": ("base", "reference", "ops", "models", "data", "eval"),
    "lang": ("base", "reference", "ops", "train"),
    "integrations": ("base", "reference", "ops"),
    "entry": ("base", "kernels", "reference", "ops", "models", "data", "eval", "train", "lang", "integrations"),
}

SOURCE_DIRS = ("rlvrw", "kernels", "csrc", "bench", "tests", "examples", ".ci")
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".sh")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the installed package (kernels/ as rlvrw.kernels.*)."""
    found = {}
    for path in sorted((ROOT / "rlvrw").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        found[f"rlvrw.kernels.{path.stem}"] = path
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The rlvrw modules ``name`` imports anywhere in its source, each resolved to the module file it runs."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            # ``from package import submodule`` depends on the submodule; importing names from the package itself
            # depends on its __init__
            candidates = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        for candidate in candidates:
            while candidate not in modules and "." in candidate:
                candidate = candidate.rsplit(".", 1)[0]
            if candidate in modules and candidate != name and candidate.startswith("rlvrw"):
                targets.add(candidate)
    return targets


def layer_of(name: str) -> str:
    best = max(((len(prefix), layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
                if name == prefix or (prefix != "rlvrw" and name.startswith(prefix + "."))), default=None)
    if best is None:
        raise AssertionError(f"{name} belongs to no layer: add it to LAYERS and to docs/architecture.md")
    return best[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_every_module_belongs_to_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_import_points_up_or_sideways(graph):
    wrong = [f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})"
             for name, targets in graph.items() for target in sorted(targets)
             if layer_of(target) != layer_of(name) and layer_of(target) not in MAY_IMPORT[layer_of(name)]]
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(wrong)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, circles, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_import_circle(graph):
    assert import_circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(toy) == [["a", "b", "c"]]


def test_the_import_reader_resolves_relative_and_lazy_imports(tmp_path):
    package = tmp_path / "rlvrw" / "pkg"
    package.mkdir(parents=True)
    source = package / "mod.py"
    source.write_text("from . import other\nfrom .other import thing\ndef f():\n    from rlvrw.deep import x\n")
    modules = {"rlvrw.pkg.mod": source, "rlvrw.pkg.other": source, "rlvrw.deep": source, "rlvrw.pkg": source}
    assert imported_modules("rlvrw.pkg.mod", source, modules) == {"rlvrw.pkg.other", "rlvrw.deep"}


def test_no_source_file_over_600_lines():
    long = []
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in SOURCE_SUFFIXES and path.is_file():
                lines = path.read_text(errors="replace").count("\n")
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"split these files (at most {MAX_LINES} lines each):\n" + "\n".join(long)


def doc_table() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """{layer: (its modules, the layers it may import)} from the table between docs/architecture.md's layer markers."""
    text = DOC.read_text()
    block = text[text.index("<!-- layers:begin -->"):text.index("<!-- layers:end -->")]
    rows = {}
    for line in block.splitlines()[3:]:  # the marker, the header and the |---| line
        if line.startswith("|"):
            layer, names, allowed = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows[layer] = (tuple(re.findall(r"`([^`]+)`", names)),
                           () if allowed == "-" else tuple(part.strip() for part in allowed.split(",")))
    return rows


def test_the_doc_shows_the_layers_enforced_here():
    table = doc_table()
    assert list(table) == list(LAYERS), "docs/architecture.md's layer table lists other layers, or in another order"
    for layer, (names, allowed) in table.items():
        assert names == LAYERS[layer], f"docs/architecture.md: layer {layer} holds {LAYERS[layer]}, the doc {names}"
        assert set(allowed) == set(MAY_IMPORT[layer]), (
            f"docs/architecture.md: layer {layer} may import {MAY_IMPORT[layer]}, the doc says {allowed}")
