"""Deprecated alias of ``rlvrw.train.config``, kept for one release."""

from rlvrw.train.config import *  # noqa: F401,F403
