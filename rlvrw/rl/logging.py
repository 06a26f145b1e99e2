"""Deprecated alias of ``rlvrw.train.logging``, kept for one release."""

from rlvrw.train.logging import *  # noqa: F401,F403
