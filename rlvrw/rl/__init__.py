"""Deprecated: the old name of ``rlvrw.train``, kept for one release.

Every module that was here is an alias of its new home (see ``docs/architecture.md``): ``rlvrw.rl.pretrain`` ->
``rlvrw.train.pretrain`` (its token cache in ``rlvrw.data.token_cache``, its clips in ``rlvrw.data.clips``),
``rlvrw.rl.trainer`` -> ``rlvrw.train.trainer``, ``rlvrw.rl.checkpoint`` -> ``rlvrw.train.checkpoints``, and so on;
``python -m rlvrw.rl.pretrain`` and ``-m rlvrw.rl.trainer`` (torchrun) still run. Import from ``rlvrw.train``.

``rlvrw.rl.pipeline`` and ``rlvrw.rl.experiment`` have no file here: they are registered below as the very modules
``rlvrw.train.pipeline`` and ``rlvrw.train.experiment``, so that a file at the old path does not stop git from
following their move.
"""

import importlib
import sys

for _name in ("pipeline", "experiment"):
    sys.modules[f"{__name__}.{_name}"] = globals()[_name] = importlib.import_module(f"rlvrw.train.{_name}")
del _name
