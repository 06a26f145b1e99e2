"""The ``rlvrw`` command.

``rlvrw train`` runs the whole pipeline on its embedded default (simulator data, tokenizer, MLE world model, RLVR,
evaluation). ``rlvrw`` with no arguments runs the self-check: every op on small random inputs on every backend here,
with its error against the float64 reference and its time. Other subcommands live beside the code they run: each
module in ``SUBCOMMANDS`` has ``add_cli(subparsers)``, which adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rlvrw.usage import ArgumentParser, run_command

SUBCOMMANDS = {
    "data": "rlvrw.data.sim",
    "weights": "rlvrw.models.lpips_weights",
    "pretrain": "rlvrw.train.pretrain",
    "rl": "rlvrw.train.trainer",
    "eval": "rlvrw.train.evaluate",
    "train": "rlvrw.train.pipeline",
    "experiment": "rlvrw.train.experiment",
    "tokenizer": "rlvrw.models.tokenizer_train",
    "lang": "rlvrw.lang.cli",
}


def _selfcheck(args) -> int:
    from rlvrw import selfcheck

    return selfcheck.main()


def _report(args) -> int:
    from rlvrw.ops import format_report

    print(format_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="rlvrw", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("selfcheck", help="run every op on every backend here against the reference (the default)") \
        .set_defaults(func=_selfcheck)
    sub.add_parser("report", help="print versions and devices, for bug reports").set_defaults(func=_report)
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not (module_name == err.name or module_name.startswith(f"{err.name}.")):
                raise  # the module exists but one of its imports is missing: say so

            continue
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand ``argv`` names. Bad user input (``rlvrw.usage.UsageError``) is one line on stderr and exit
    code 2, whichever subcommand finds it; other exceptions are bugs and keep their traceback."""
    args = build_parser().parse_args(argv)
    command = getattr(args, "func", None) or _selfcheck
    names = [getattr(args, key, None) for key in ("command", "data_command", "lang_command")]
    return run_command(" ".join(["rlvrw", *filter(None, names)]), lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
