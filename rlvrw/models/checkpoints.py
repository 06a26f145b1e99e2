"""Deprecated alias of ``rlvrw.models.tokenizer_files`` (tokenizer weights on disk), kept for one release: the
name said "checkpoints" beside the training checkpoints of ``rlvrw.train.checkpoints``."""

from rlvrw.models.tokenizer_files import *  # noqa: F401,F403
from rlvrw.models.tokenizer_files import (  # noqa: F401 (the names a star import leaves out)
    _is_safetensors,
    _read_safetensors,
)
