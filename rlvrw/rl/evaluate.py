"""Deprecated alias of ``rlvrw.train.evaluate``, kept for one release."""

from rlvrw.train.evaluate import *  # noqa: F401,F403
from rlvrw.train.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
