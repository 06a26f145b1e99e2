"""Deprecated alias of ``rlvrw.train.checkpoints`` (run checkpoints), kept for one release."""

from rlvrw.train.checkpoints import *  # noqa: F401,F403
