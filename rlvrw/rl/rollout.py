"""Deprecated alias of ``rlvrw.train.rollout``, kept for one release."""

from rlvrw.train.rollout import *  # noqa: F401,F403
