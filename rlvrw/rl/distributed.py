"""Deprecated alias of ``rlvrw.train.distributed``, kept for one release."""

from rlvrw.train.distributed import *  # noqa: F401,F403
