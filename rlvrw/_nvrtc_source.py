"""The CUDA kernels of ``csrc/`` as NVRTC compiles them, and their signatures, read from the sources themselves.

``rlvrw._C_cupy`` compiles the torch-free kernels at first use when the extension ``rlvrw._C`` was not built. NVRTC
compiles device code only and has no C library headers, so ``translation_unit(name)`` gives a ``csrc/*.cu`` file
with its local headers inlined once, the system headers NVRTC lacks replaced by ``PREAMBLE``, and every host function
left out (the launchers and the ``extern "C"`` API: NVRTC rejects host code). What stays is the kernels, the device
helpers, the types and the constants, character for character as nvcc compiles them.

``kernels(name)`` reads every ``__global__`` function of a unit: its template parameters and its parameters (type and
name, in order), and ``structs`` / ``constants`` the plain structs passed by value and the ``constexpr`` integers.
The glue launches a kernel by parameter name against these (``rlvrw._C_cupy.Launcher``), so a kernel that gains,
loses or reorders a parameter fails there with a message naming it, not with a misread argument.

Pure text processing: no torch, cupy or CUDA needed (CPU tests check all of it).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import operator
import re
from dataclasses import dataclass
from pathlib import Path

UNITS = ("logits_forward.cu", "logits_backward.cu", "fsq.cu")
# NVRTC has the CUDA headers below (cupy passes their folder) but no C library: these includes are replaced by
# PREAMBLE; cuda_runtime*.h is host API that device code does not need.
PROVIDED_HEADERS = ("cuda_fp16.h", "cuda_bf16.h")
REPLACED_HEADERS = ("float.h", "limits.h", "stdint.h", "string.h", "cuda_runtime.h", "cuda_runtime_api.h")
PREAMBLE = """\
// rlvrw: what <stdint.h>, <float.h>, <limits.h> and <math.h> give the kernels under nvcc (NVRTC has none of them).
// LP64 (Linux) types, identical to glibc's, so that nvcc compiles this text too.
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef unsigned long uintptr_t;
#ifndef FLT_MAX
#define FLT_MAX 3.40282347e+38F
#endif
#ifndef INT_MAX
#define INT_MAX 2147483647
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
"""
DEVICE_MARKS = ("__global__", "__device__", "RLVRW_HD")


def csrc_dir() -> Path:
    """Where the kernel sources are: ``rlvrw/_csrc`` in a wheel, ``csrc/`` in a checkout or an editable install."""
    try:
        spec = importlib.util.find_spec("rlvrw._csrc")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / UNITS[0]).is_file():
            return Path(location)
    checkout = Path(__file__).resolve().parents[1] / "csrc"
    if (checkout / UNITS[0]).is_file():
        return checkout
    raise FileNotFoundError("the CUDA kernel sources (csrc/*.cu) are not installed with rlvrw")


# ---- splitting C++ into top-level items ------------------------------------------------------------------------------
def _skip_literal(text: str, i: int) -> int:
    """Index just past the comment or string/char literal starting at text[i] (i itself when there is none)."""
    if text.startswith("//", i):
        end = text.find("\n", i)
        return len(text) if end < 0 else end
    if text.startswith("/*", i):
        end = text.find("*/", i + 2)
        return len(text) if end < 0 else end + 2
    if text[i] in "\"'":
        quote, j = text[i], i + 1
        while j < len(text) and text[j] != quote:
            j += 2 if text[j] == "\\" else 1
        return j + 1
    return i


def _matching_brace(text: str, open_at: int) -> int:
    depth, i = 0, open_at
    while i < len(text):
        j = _skip_literal(text, i)
        if j != i:
            i = j
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced braces in a csrc file")


def _code(text: str) -> str:
    """text without comments (string literals kept), for classifying an item by its head."""
    out, i = [], 0
    while i < len(text):
        j = _skip_literal(text, i)
        if j != i:
            if text[i] in "\"'":
                out.append(text[i:j])
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@dataclass
class Item:
    kind: str  # "pp" (preprocessor line), "namespace", "extern_c", "type", "function", "other"
    text: str
    body: list[Item] | None = None  # the items of a namespace
    name: str = ""


def split_items(text: str) -> list[Item]:
    """The top-level items of C++ source text: preprocessor lines, namespaces (split recursively), extern "C"
    blocks, type definitions, functions (declared or defined) and other declarations."""
    items, i, start = [], 0, 0
    while i < len(text):
        if text[i] == "#" and not _code(text[start:i]).strip():
            end = i
            while True:  # a directive runs to an unescaped newline
                end = text.find("\n", end)
                if end < 0 or text[end - 1] != "\\":
                    break
                end += 1
            end = len(text) if end < 0 else end + 1
            items.append(Item("pp", text[start:end]))
            i = start = end
            continue
        j = _skip_literal(text, i)
        if j != i:
            i = j
            continue
        if text[i] == ";":
            items.append(_classify(text[start:i + 1], None))
            i = start = i + 1
            continue
        if text[i] == "{":
            close = _matching_brace(text, i)
            head = _code(text[start:i]).strip()
            if re.match(r"^(namespace\b|extern\s+\"C\"\s*$)", head):
                kind = "namespace" if head.startswith("namespace") else "extern_c"
                body = split_items(text[i + 1:close]) if kind == "namespace" else None
                name = head.split()[1] if kind == "namespace" and len(head.split()) > 1 else ""
                items.append(Item(kind, text[start:close + 1], body, name))
                i = start = close + 1
                continue
            if re.match(r"^(template\s*<.*?>\s*)?(struct|class|union|enum)\b", head, re.S) or "=" in head.split("(")[0]:
                end = text.find(";", close)  # a type or an initialized variable ends at its semicolon
                items.append(_classify(text[start:end + 1], i - start))
                i = start = end + 1
                continue
            items.append(_classify(text[start:close + 1], i - start))  # a function body
            i = start = close + 1
            continue
        i += 1
    if text[start:]:  # trailing whitespace and comments
        items.append(Item("other", text[start:]))
    return items


def _classify(text: str, body_at: int | None) -> Item:
    head = _code(text if body_at is None else text[:body_at]).strip()
    if re.match(r"^(template\s*<.*?>\s*)?(struct|class|union|enum)\b", head, re.S) and "(" not in head.split("{")[0]:
        return Item("type", text)
    before_init = head.split("=", 1)[0]
    if "(" in before_init and not head.startswith(("using", "typedef", "static_assert")):
        return Item("function", text)
    return Item("other", text)


def _is_device(item: Item) -> bool:
    head = _code(item.text).split("{", 1)[0]
    return any(re.search(rf"\b{mark}\b", head) for mark in DEVICE_MARKS)


def _keep(items: list[Item]) -> str:
    out = []
    for item in items:
        if item.kind == "namespace":
            out.append(f"namespace {item.name} {{\n{_keep(item.body)}\n}}  // namespace {item.name}\n")
        elif item.kind == "extern_c" or (item.kind == "function" and not _is_device(item)):
            continue  # host code: launchers and the C API
        else:
            out.append(item.text)
    return "".join(out)


# ---- translation units --------------------------------------------------------------------------------------------
def _inline(name: str, root: Path, seen: set[str]) -> str:
    out = []
    for line in (root / name).read_text().splitlines(keepends=True):
        local = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        system = re.match(r"\s*#\s*include\s+<([^>]+)>", line)
        if local:
            if local.group(1) not in seen:
                seen.add(local.group(1))
                out.append(_inline(local.group(1), root, seen))
        elif system and system.group(1) in REPLACED_HEADERS:
            continue
        elif system and system.group(1) not in PROVIDED_HEADERS:
            raise ValueError(f"csrc/{name} includes <{system.group(1)}>, which NVRTC does not have: add it to "
                             "rlvrw._nvrtc_source.PROVIDED_HEADERS or REPLACED_HEADERS")
        elif re.match(r"\s*#\s*pragma\s+once\b", line):
            continue
        else:
            out.append(line)
    return "".join(out)


@functools.cache
def translation_unit(name: str, root: Path | None = None) -> str:
    """The source NVRTC compiles for csrc/``name``: PREAMBLE, then the device code of the file and its headers."""
    if name not in UNITS:
        raise ValueError(f"name must be one of {UNITS}, got {name!r}")
    root = csrc_dir() if root is None else root
    return PREAMBLE + _keep(split_items(_inline(name, root, {name})))


# ---- signatures -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    type: str  # without const / __restrict__ / the name, e.g. "T*", "int64_t", "Strides3"
    name: str

    @property
    def is_pointer(self) -> bool:
        return self.type.endswith("*")


@dataclass(frozen=True)
class Kernel:
    name: str  # qualified, e.g. "rlvrw::detail::logits_forward_kernel"
    template: tuple[str, ...]  # template parameter names, in order
    params: tuple[Param, ...]


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _param(text: str) -> Param:
    words = re.sub(r"\b(const|volatile|__restrict__)\b", " ", text.split("=", 1)[0]).replace("*", " * ").split()
    name = words[-1]
    base = [w for w in words[:-1] if w != "*"]
    return Param("".join(base) + "*" * words[:-1].count("*"), name)


def _walk(items: list[Item], scope: tuple[str, ...]):
    for item in items:
        if item.kind == "namespace":
            yield from _walk(item.body, scope + (item.name,))
        else:
            yield scope, item


@functools.cache
def kernels(name: str, root: Path | None = None) -> dict[str, Kernel]:
    """The ``__global__`` functions of csrc/``name``, by unqualified name."""
    found = {}
    for scope, item in _walk(split_items(translation_unit(name, root)), ()):
        code = _code(item.text)
        if item.kind != "function" or not re.search(r"\b__global__\b", code.split("{", 1)[0]):
            continue
        head = re.sub(r"__launch_bounds__\s*\([^)]*\)", " ", code.split("{", 1)[0])
        template = re.match(r"\s*template\s*<(.*?)>\s*(?=__global__|\w)", head, re.S)
        match = re.search(r"(\w+)\s*\((.*)\)\s*$", head[template.end():] if template else head, re.S)
        if match is None:
            raise ValueError(f"cannot read the kernel declaration {head.strip()!r} in csrc/{name}")
        tparams = tuple(p.split()[-1] for p in _split_top(template.group(1))) if template else ()
        params = tuple(_param(p) for p in _split_top(match.group(2)))
        found[match.group(1)] = Kernel("::".join(scope + (match.group(1),)), tparams, params)
    return found


def expression(kernel: Kernel, *args) -> str:
    """The name expression of one instantiation, e.g. ``rlvrw::detail::fsq_gather_kernel<uint4, int64_t>``."""
    if len(args) != len(kernel.template):
        raise ValueError(f"{kernel.name} takes template arguments {kernel.template}, got {args}")
    text = ", ".join(("true" if a else "false") if isinstance(a, bool) else str(a) for a in args)
    return f"{kernel.name}<{text}>" if kernel.template else kernel.name


@functools.cache
def structs(name: str, root: Path | None = None) -> dict[str, tuple[tuple[str, str], ...]]:
    """Plain structs of csrc/``name`` (fields only, no methods or initializers): name -> ((type, field), ...)."""
    found = {}
    for _, item in _walk(split_items(translation_unit(name, root)), ()):
        code = _code(item.text)
        match = re.match(r"\s*struct\s+(\w+)\s*\{(.*)\}\s*;\s*$", code, re.S)
        if item.kind != "type" or match is None or re.search(r"[(=]", match.group(2)):
            continue
        fields = []
        for decl in filter(str.strip, match.group(2).split(";")):
            words = decl.replace(",", " , ").split()
            ctype = words[0]
            fields += [(ctype, w) for w in words[1:] if w != ","]
        found[match.group(1)] = tuple(fields)
    return found


_OPS = {ast.LShift: operator.lshift, ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub}


def _int_expr(text: str) -> int:
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not a plain integer expression: {text!r}")

    return value(ast.parse(text.strip(), mode="eval").body)


@functools.cache
def constants(name: str, root: Path | None = None) -> dict[str, int]:
    """``constexpr`` integers of csrc/``name`` and its headers (e.g. kMaxGridBlocks), by name."""
    found = {}
    for _, item in _walk(split_items(translation_unit(name, root)), ()):
        match = re.match(r"\s*constexpr\s+(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*([^;]+);", _code(item.text))
        if match:
            found[match.group(1)] = _int_expr(match.group(2))
    return found
