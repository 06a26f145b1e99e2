"""Loads the optional CUDA extension ``rlvrw._C`` (built from ``csrc/`` by setup.py when a CUDA torch and nvcc are
present). Importing the shared library registers the ops named in ``OPS`` under ``torch.ops.rlvrw``.

When the extension was not built, the same ops come from the same kernels compiled at first use with NVRTC through
cupy (``rlvrw._C_cupy``, the ``cupy`` extra): the ``cuda`` backend is then served by them. ``BACKEND`` says which
("extension" or "cupy").

``load()`` tries once and caches the answer; it never raises. When neither is available the reasons are kept in
``LOAD_ERROR`` for reports (``rlvrw.ops`` then falls back to the Triton or reference backends).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

EXTENSION = "rlvrw._C"
OPS = (
    "logits_forward",
    "logits_backward_",
    "fsq_quantize",
    "fsq_quantize_backward",
    "fsq_codes_to_indices",
    "fsq_indices_to_codes",
    "fsq_gather",
)

LOAD_ERROR: str | None = None
BACKEND: str | None = None
_loaded: bool | None = None
_lock = threading.Lock()


def _ops_registered() -> bool:
    import torch

    namespace = torch.ops.rlvrw
    return all(hasattr(namespace, name) for name in OPS)


def load() -> bool:
    """Import ``rlvrw._C`` (else register the cupy fallback) once; True when the ops are registered with torch.
    Never raises."""
    global BACKEND, LOAD_ERROR, _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        error: str | None = None
        ok = False
        try:
            import torch  # noqa: F401 - loads libtorch / libc10 that the extension links against

            importlib.import_module(EXTENSION)
        except Exception as exc:  # ImportError (not built, ABI mismatch, missing libcudart) or anything else
            error = f"{type(exc).__name__}: {exc}"
        try:
            ok = _ops_registered()
        except Exception as exc:
            ok = False
            error = error or f"{type(exc).__name__}: {exc}"
        if not ok and error is None:
            error = f"{EXTENSION} was imported but torch.ops.rlvrw.{'/'.join(OPS)} are not registered"
        backend = "extension" if ok else None
        if not ok:
            try:
                from rlvrw import _C_cupy

                ok = _C_cupy.register() and _ops_registered()
                fallback = _C_cupy.ERROR
            except Exception as exc:  # torch itself not importable
                ok, fallback = False, f"{type(exc).__name__}: {exc}"
            backend = "cupy" if ok else None
            error = f"{error}; the cupy fallback: {fallback}"
        BACKEND = backend
        LOAD_ERROR = None if ok else error
        _loaded = ok
        return ok


def version_info() -> dict:
    """What is known about the extension: whether a built module exists, whether it loaded, and why not."""
    info: dict = {"extension": EXTENSION, "built": False, "path": None}
    try:
        spec = importlib.util.find_spec(EXTENSION)
    except Exception:
        spec = None
    if spec is not None:
        info["built"] = True
        info["path"] = spec.origin
    info["loaded"] = load()
    info["error"] = LOAD_ERROR
    info["backend"] = BACKEND
    info["ops"] = list(OPS) if info["loaded"] else []
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    except Exception as exc:
        info["torch"] = None
        info["torch_cuda"] = None
        info["error"] = info["error"] or f"{type(exc).__name__}: {exc}"
    return info
