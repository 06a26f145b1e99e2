"""Triton kernels and their launchers, installed as ``rlvrw.kernels``. Nothing here checks inputs: see ``rlvrw.ops``.

The kernels live in the repository's top-level ``kernels/`` folder. That folder has no ``__init__.py`` on purpose:
a checkout's root is on ``sys.path`` whenever Python runs from it (``python3 -m pytest``, ``python3 -m rlvrw``), and a
regular package there named ``kernels`` would shadow Hugging Face's ``kernels``, which transformers imports. As a
namespace portion it never wins over a real package. A built wheel copies the folder's modules here (setup.py maps
``rlvrw.kernels`` to ``kernels/``); a checkout or an editable install finds them through ``__path__`` below.
"""

from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parents[2]
if (_SOURCE_TREE / "setup.py").is_file() and (_SOURCE_TREE / "kernels").is_dir():
    __path__.append(str(_SOURCE_TREE / "kernels"))
