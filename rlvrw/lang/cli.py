"""``rlvrw lang``: train and evaluate language world models (text games, web pages) from the command line.

    rlvrw lang make-tiny --task text_game --data train.jsonl --out tiny/      # a tiny model for a CPU demo
    rlvrw lang sft  --task text_game --data train.jsonl --model tiny/ --out runs/sft
    rlvrw lang rl   --task text_game --data train.jsonl --model runs/sft/model --out runs/rl --reward task
    rlvrw lang eval --task text_game --data test.jsonl --model runs/rl/model --out results.json
    rlvrw lang eval --task web --data sample.json --gold                      # score the gold answers themselves

Options left out take the defaults of ``SFTConfig`` / ``GRPOConfig`` in ``rlvrw.lang.train``. Bad input (a records
file, a setting, a responses file, a missing package) is one error line and exit code 2 (``rlvrw.usage``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

from rlvrw import usage
from rlvrw.guard import ON_NONFINITE, ON_NONFINITE_HELP
from rlvrw.lang.tasks import TASK_NAMES, TEXT_GAME_REWARDS, get_task
from rlvrw.usage import UsageError


def _add_data(parser):
    parser.add_argument("--task", choices=TASK_NAMES, required=True, help="text_game (ByteSized32) or web (WebArena)")
    parser.add_argument("--data", required=True, help="records: JSON Lines, or a JSON list")
    parser.add_argument("--limit", type=int, help="use the first N good records")


def _add_run(parser, lora_default: bool):
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--out", dest="out_dir", required=True, help="run directory (log.jsonl, checkpoints, model/)")
    if lora_default:
        parser.add_argument("--no-lora", dest="use_lora", action="store_false", help="train every weight")
    else:
        parser.add_argument("--lora", dest="use_lora", action="store_true", help="train LoRA adapters only")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--max-prompt-tokens", type=int)
    parser.add_argument("--device", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--save-every", type=int, help="write a checkpoint every N steps (0: only the final model)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--on-nonfinite", choices=ON_NONFINITE, help=ON_NONFINITE_HELP + " (default: stop)")


def add_cli(subparsers) -> None:
    """Register ``lang`` and its subcommands sft, rl, eval, make-tiny on the ``rlvrw`` parser."""
    lang = subparsers.add_parser("lang", help="language world models: text games and web pages",
                                 description=__doc__.split("\n\n")[0])
    sub = lang.add_subparsers(dest="lang_command", required=True)

    sft = sub.add_parser("sft", help="supervised fine-tuning on the gold answers (LoRA by default)")
    _add_data(sft)
    _add_run(sft, lora_default=True)
    sft.add_argument("--epochs", type=int)
    sft.add_argument("--max-steps", type=int)
    sft.add_argument("--batch-size", type=int)
    sft.add_argument("--max-response-tokens", type=int)
    sft.set_defaults(func=_sft)

    rl = sub.add_parser("rl", help="GRPO with the task's verifiable reward (full fine-tuning by default)")
    _add_data(rl)
    _add_run(rl, lora_default=False)
    rl.add_argument("--reward", choices=TEXT_GAME_REWARDS, default="binary", help="text_game reward (web: F1)")
    rl.add_argument("--steps", type=int)
    rl.add_argument("--prompts-per-step", type=int)
    rl.add_argument("--group-size", type=int)
    rl.add_argument("--temperature", type=float)
    rl.add_argument("--max-new-tokens", type=int)
    rl.add_argument("--kl-coef", type=float)
    rl.add_argument("--backend", choices=["auto", "hf", "vllm"])
    rl.add_argument("--generate-batch-size", type=int)
    rl.add_argument("--reward-workers", type=int, help="processes scoring responses (0: in the trainer)")
    rl.set_defaults(func=_rl)

    ev = sub.add_parser("eval", help="score a model's answers (or saved responses, or the gold answers)")
    _add_data(ev)
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local model directory: its greedy answers are scored")
    source.add_argument("--responses", help="JSON Lines of responses (strings, or objects with 'response')")
    source.add_argument("--gold", action="store_true", help="score the gold answers (a check of the scorer)")
    ev.add_argument("--out", help="write the metrics (and responses) as JSON here")
    ev.add_argument("--max-new-tokens", type=int, default=2048)
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ev.set_defaults(func=_eval)

    tiny = sub.add_parser("make-tiny", help="build a tiny model whose tokenizer is trained on the task's data")
    _add_data(tiny)
    tiny.add_argument("--out", required=True, help="model directory to write")
    tiny.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    tiny.add_argument("--vocab-size", type=int, default=2048)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.set_defaults(func=_make_tiny)


@contextlib.contextmanager
def _user_input(flag: str | None = None):
    """Around the reading of what the user gave (the records file, the settings, the flags of a tiny model): their
    checks' ValueErrors are about that input, so they become ``UsageError``s naming ``flag`` (one line and exit code
    2 from ``rlvrw``'s main). A ValueError from anywhere else is a bug and keeps its traceback."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(f"{flag}: {err}" if flag else str(err)) from err


def _records(args):
    with _user_input("--data"):
        task = get_task(args.task, getattr(args, "reward", "binary"))
        loaded = task.load(args.data, args.limit)
    print(f"{args.data}: {len(loaded)} records" + (f", {len(loaded.skipped)} skipped" if loaded.skipped else ""))
    if not loaded.records:
        raise UsageError(f"data {args.data!r} holds no usable record")
    return task, loaded.records


def _config(cls, args):
    from rlvrw.lang.hf_model import LoraSettings

    names = {f.name for f in dataclasses.fields(cls)} - {"lora"}
    given = {name: value for name, value in vars(args).items() if name in names and value is not None}
    with _user_input():
        lora = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha) if args.use_lora else None
        return cls(**given, lora=lora)


def _quiet_libraries():
    from rlvrw.lang.hf_model import transformers

    transformers()  # without it, one line naming the extra to install
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _sft(args) -> int:
    from rlvrw.lang.train import SFTConfig, run_sft

    task, records = _records(args)
    config = _config(SFTConfig, args)
    _quiet_libraries()
    summary = run_sft(task, records, config)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))
    return 0


def _rl(args) -> int:
    from rlvrw.lang.train import GRPOConfig, run_grpo

    task, records = _records(args)
    config = _config(GRPOConfig, args)
    _quiet_libraries()
    summary = run_grpo(task, records, config)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))
    return 0


def _read_responses(path: str) -> list[str]:
    responses = []
    with open(usage.existing_file("--responses", path, "a JSON Lines file of responses"), encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"--responses {path}: line {number} is not JSON ({err})") from err
            value = value.get("response") if isinstance(value, dict) else value
            if not isinstance(value, str):
                raise UsageError(f"responses line {number} must be a JSON string or an object with 'response'")
            responses.append(value)
    return responses


def _eval(args) -> int:
    from rlvrw.files import write_json

    task, records = _records(args)
    if args.out:
        usage.output_file("--out", args.out)
    if args.gold:
        responses = [task.gold_response(r) for r in records]
    elif args.responses:
        responses = _read_responses(args.responses)
        if len(responses) != len(records):
            raise UsageError(f"--responses {args.responses} holds {len(responses)} responses for {len(records)} "
                             f"records of --data {args.data}")
    else:
        from rlvrw.lang.train import generate_responses

        usage.existing_dir("--model", args.model, "a local Hugging Face model directory", "config.json")
        _quiet_libraries()
        responses = generate_responses(task, records, args.model, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, batch_size=args.batch_size, device=args.device,
                                       dtype=args.dtype)
    metrics = task.evaluate(responses, records)
    print(format_metrics(args.task, metrics))
    if args.out:
        write_json(args.out, {"task": args.task, "data": args.data, "metrics": metrics, "responses": responses})
    return 0


def format_metrics(task_name: str, metrics: dict) -> str:
    """A small table of the evaluation: Table 1's accuracy columns for text games, P/R/F1 for web pages."""

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    if task_name == "text_game":
        acc, count = metrics["accuracy"], metrics["count"]
        rows = [f"{name:<10} {cell(acc[name]):>8} {count[name]:>6}" for name in ("unchanged", "changed", "all")]
        lines = [f"{'accuracy':<10} {'value':>8} {'n':>6}", *rows, f"task reward mean: {cell(metrics['task_reward'])}"]
    else:
        lines = [f"{name:<10} {cell(metrics[name]):>8}" for name in ("precision", "recall", "f1")]
        lines.append(f"n: {metrics['count']}")
    lines.append(f"unparseable: {metrics['unparseable']}")
    return "\n".join(lines)


def _make_tiny(args) -> int:
    from rlvrw.lang.tiny_model import build_tiny_model

    task, records = _records(args)
    usage.output_dir("--out", args.out)
    for flag, value in (("--vocab-size", args.vocab_size), ("--hidden-size", args.hidden_size),
                        ("--layers", args.layers)):
        if value < 1:
            raise UsageError(f"{flag} must be a positive int, got {value}")
    _quiet_libraries()
    texts = [task.build_prompt(r) for r in records] + [task.gold_response(r) for r in records]
    with _user_input():  # build_tiny_model's checks of the flags (vocabulary size, heads)
        build_tiny_model(args.out, texts, arch=args.arch, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         layers=args.layers)
    print(f"tiny {args.arch} model written to {args.out}")
    return 0
