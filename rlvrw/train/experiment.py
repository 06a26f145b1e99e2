"""RLVR-World's analysis of its video world models (Fig. 4), in miniature on ``rlvrw train``'s default data, and the
``rlvrw experiment`` command.

    rlvrw experiment run [--work-dir runs/experiment] [--out docs/results] [--seeds 0 1] [--parts ...] [key=value ...]
    rlvrw experiment report [--results docs/results] [--readme README.md] [--check]

``run`` trains, per training seed, the whole default pipeline (``rlvrw train``: data, tokenizer, MLE pre-training, RLVR
with -(L1 + LPIPS), evaluations sampled and greedy) into ``WORK/seed<s>`` (every stage reused when already there), then
from that seed's MLE model:

- ``metrics`` (Fig. 4c): one RLVR run per reward metric (``ops.frame_reward``: mae, mse, psnr, ssim, lpips, and the
  pipeline's l1+lpips run), each evaluated on every metric: does each reward win on its own metric?
- ``group_size`` (Fig. 4b): RLVR with -(L1 + LPIPS) at G = 4, 8, 16 samples per prompt (the prompts per step fixed).
- ``best_of_n`` (Fig. 4a): the MLE and the RLVR model, 16 samples per held-out clip, the best of the first N for
  N = 1, 2, 4, 8, 16.
- ``multistep`` (Table 3, not in the default parts: several times the default pipeline's cost per seed): ``rlvrw train
  preset=multistep`` into ``WORK/multistep_seed<s>``: LPIPS at every prediction horizon and the repetition rate of
  the MLE and the RLVR model, sampled and greedy, and the repetition-rejection baseline (per clip, the first of the
  samples that repeats no frame).

Every RL run uses the pipeline's settings (``key=value`` overrides them for every run, as for ``rlvrw train``) and
every evaluation is the pipeline's: the held-out clips, ``eval_group_size`` samples per clip (the tables use their
mean: the expected score of one sample), the same sampling seed. ``OUT/<part>.json`` holds every seed's numbers and
their mean, ``OUT/<part>.png`` the plot (matplotlib, the ``plot`` extra), ``OUT/default.json`` the default runs'
``eval.json`` rows. ``report`` turns those files into the markdown block that README.md shows between its
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers (``--readme`` rewrites it, ``--check`` fails if it
differs), so the README's numbers are always the runs' own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from rlvrw import files

PARTS = ("metrics", "group_size", "best_of_n")
ALL_PARTS = (*PARTS, "multistep")
MULTISTEP_ROWS = ("copy_last", "tokenizer", "mle", "mle_no_repeat", "mle_greedy", "rlvr", "rlvr_no_repeat",
                  "rlvr_greedy")
REWARDS = ("mae", "mse", "psnr", "ssim", "lpips", "l1+lpips")
GROUP_SIZES = (4, 8, 16)
BEST_OF = 16
TABLE_METRICS = ("l1", "mse", "psnr", "ssim", "lpips")  # l1 is the MAE
HIGHER_IS_BETTER = ("psnr", "ssim")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DEFAULT_ROWS = ("copy_last", "tokenizer", "mle", "rlvr", "mle_greedy", "rlvr_greedy")


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


def _metric_row(row: dict) -> dict:
    return {name: row[name] for name in TABLE_METRICS}


def seed_pipeline(config, work_dir: Path, seed: int) -> tuple[Path, dict]:
    """The default pipeline of one training seed (reused where done): (its run directory, its eval.json)."""
    from rlvrw.train.pipeline import run

    run_dir = work_dir / f"seed{seed}"
    return run_dir, run(dataclasses.replace(config, seed=seed), run_dir)


def rl_variant(config, run_dir: Path, name: str, group_size: int | None = None) -> dict:
    """RLVR from the seed's MLE model with ``config``'s reward into ``DIR/rl_<name>``, evaluated into
    ``DIR/eval_<name>`` with ``group_size`` samples per clip (default the pipeline's): the evaluation's result."""
    from rlvrw.train.pipeline import eval_stage, prepare_data, rl_stage

    tokenizer, pretrain_dir = run_dir / "tokenizer.safetensors", run_dir / "pretrain"
    rl_dir = rl_stage(config, tokenizer, pretrain_dir, run_dir, f"rl_{name}")
    eval_config = config if group_size is None else dataclasses.replace(config, eval_group_size=group_size)
    return eval_stage(eval_config, rl_dir / "model", prepare_data(config), tokenizer, run_dir / f"eval_{name}")


def run_metrics(config, run_dir: Path, summary: dict) -> dict:
    """{reward: mean-of-G metrics after RLVR with that reward}, and "mle"."""
    rows = {"mle": _metric_row(summary["mean_of_n"]["mle"])}
    for reward in REWARDS:
        if reward == config.reward:
            rows[reward] = _metric_row(summary["mean_of_n"]["rlvr"])
            continue
        result = rl_variant(dataclasses.replace(config, reward=reward), run_dir, "reward_" + reward.replace("+", "_"))
        rows[reward] = _metric_row(result["mean_of_n"])
    return rows


def run_group_sizes(config, run_dir: Path, summary: dict) -> dict:
    """{str(G): mean-of-samples metrics after RLVR with G samples per prompt}, and "mle"."""
    rows = {"mle": _metric_row(summary["mean_of_n"]["mle"])}
    for group in GROUP_SIZES:
        if group == config.rl_group_size and config.reward == "l1+lpips":
            rows[str(group)] = _metric_row(summary["mean_of_n"]["rlvr"])
            continue
        changed = dataclasses.replace(config, reward="l1+lpips", rl_group_size=group)
        rows[str(group)] = _metric_row(rl_variant(changed, run_dir, f"group{group}")["mean_of_n"])
    return rows


def run_best_of_n(config, run_dir: Path) -> dict:
    """{"mle", "rlvr": {str(N): best of the first N of 16 samples}} on the held-out clips."""
    from rlvrw.train.pipeline import eval_stage, prepare_data

    tokenizer, episodes = run_dir / "tokenizer.safetensors", prepare_data(config)
    wide = dataclasses.replace(config, eval_group_size=BEST_OF)
    curves = {}
    for model, model_dir in (("mle", run_dir / "pretrain" / "model"), ("rlvr", run_dir / "rl" / "model")):
        result = eval_stage(wide, model_dir, episodes, tokenizer, run_dir / f"eval_{model}_best_of_{BEST_OF}")
        curves[model] = {n: _metric_row(row) for n, row in result["best_of_n_curve"].items()}
    return curves


def run_multistep(config, work_dir: Path, seed: int) -> dict:
    """Table 3's rows of ``preset=multistep`` for one seed: {row: {"lpips": per-horizon list, "repetition_rate"}}."""
    from rlvrw.train.pipeline import PRESETS, run

    multistep = dataclasses.replace(config, **{**PRESETS["multistep"], "preset": "multistep", "seed": seed})
    summary = run(multistep, work_dir / f"multistep_seed{seed}")
    rates = {"copy_last": summary["baselines"]["copy_last"], "tokenizer": summary["baselines"]["tokenizer"],
             "mle": summary["mle"], "rlvr": summary["rlvr"], **{f"{m}_greedy": r for m, r in summary["greedy"].items()},
             **{f"{m}_no_repeat": r for m, r in summary["no_repeat"].items()}}
    return {name: {"lpips": summary["per_step"][name]["lpips"], "repetition_rate": rates[name]["repetition_rate"]}
            for name in MULTISTEP_ROWS if name in summary["per_step"]}


def mean_over_seeds(per_seed: dict):
    """The element-wise mean of nested dicts (and lists) of numbers, one per seed."""
    first = next(iter(per_seed.values()))
    if isinstance(first, dict):
        return {key: mean_over_seeds({s: v[key] for s, v in per_seed.items()}) for key in first}
    if isinstance(first, list):
        return [mean_over_seeds({s: v[i] for s, v in per_seed.items()}) for i in range(len(first))]
    return sum(per_seed.values()) / len(per_seed)


def default_rows(summary: dict) -> dict:
    """The default run's headline rows: copy-last, tokenizer, MLE and RLVR sampled (mean of G) and greedy."""
    rows = {"copy_last": summary["baselines"]["copy_last"], "tokenizer": summary["baselines"]["tokenizer"],
            "mle": summary["mean_of_n"]["mle"], "rlvr": summary["mean_of_n"]["rlvr"],
            "mle_first": summary["mle"], "rlvr_first": summary["rlvr"]}
    rows.update({f"{model}_greedy": row for model, row in summary.get("greedy", {}).items()})
    return {name: _metric_row(row) for name, row in rows.items()}


def run(config, work_dir: Path, out_dir: Path, seeds, parts=PARTS) -> dict:
    """Every part for every seed (see the module doc); writes OUT/<part>.json and .png and OUT/default.json."""
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    collected = {part: {} for part in ("default", *parts)}
    settings, clips = {}, {}
    for seed in seeds:
        if "multistep" in parts:
            collected["multistep"][str(seed)] = run_multistep(config, work_dir, seed)
        if parts == ("multistep",):
            continue
        run_dir, summary = seed_pipeline(config, work_dir, seed)
        settings = {k: v for k, v in summary["config"].items() if k != "seed"}
        collected["default"][str(seed)] = default_rows(summary)
        if "metrics" in parts:
            collected["metrics"][str(seed)] = run_metrics(config, run_dir, summary)
        if "group_size" in parts:
            collected["group_size"][str(seed)] = run_group_sizes(config, run_dir, summary)
        if "best_of_n" in parts:
            collected["best_of_n"][str(seed)] = run_best_of_n(config, run_dir)
        clips.update(dict.fromkeys(("default", *PARTS), summary["clips"]))
    written = {}
    for part, per_seed in collected.items():
        if not per_seed:
            continue
        previous = out_dir / f"{part}.json"
        if previous.is_file():  # seeds run earlier with the same settings stay (a run can add one seed at a time)
            old = json.loads(previous.read_text())
            if old.get("settings") == json.loads(json.dumps(settings)):
                per_seed = {**old["per_seed"], **per_seed}
                clips.setdefault(part, old.get("clips"))
        per_seed = dict(sorted(per_seed.items(), key=lambda item: int(item[0])))
        result = {"part": part, "seeds": [int(s) for s in per_seed], "clips": clips.get(part), "per_seed": per_seed,
                  "mean": mean_over_seeds(per_seed), "settings": settings}
        files.write_json(out_dir / f"{part}.json", result)
        written[part] = result
        try:
            plot(part, result, out_dir / f"{part}.png")
        except ImportError as err:  # matplotlib is optional: the JSON above is the result, the PNG only its picture
            print(f"rlvrw experiment: {err}; {part}.png not written", file=sys.stderr)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the experiment's plots need matplotlib (pip install matplotlib, or rlvrw[plot])") from err
    return plt


def relative_gain(row: dict, base: dict, metric: str) -> float:
    """Percent improvement of ``row`` over ``base`` on ``metric`` (positive is better whichever way it points)."""
    change = (row[metric] - base[metric]) / abs(base[metric]) * 100
    return change if metric in HIGHER_IS_BETTER else -change


def _seed_curves(ax, sizes: list[str], per_seed: list[dict], mean: dict, color: str, label: str) -> None:
    """LPIPS against ``sizes``: one thin line per seed, the mean over seeds bold and labelled."""
    xs = [int(size) for size in sizes]
    for rows in per_seed:
        ax.plot(xs, [rows[size]["lpips"] for size in sizes], "-", color=color, alpha=0.35, lw=1)
    ax.plot(xs, [mean[size]["lpips"] for size in sizes], "o-", color=color, lw=2, label=label)


def _log2_axis(ax, sizes: list[str], xlabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(size) for size in sizes], sizes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("LPIPS (lower is better)")
    ax.legend(fontsize=8)


def plot(part: str, result: dict, path: Path) -> None:
    """The part's figure as a PNG at ``path``."""
    plt = _pyplot()
    seeds = list(result["per_seed"])
    mean = result["mean"]
    fig = None
    if part == "default":
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        names = [n for n in ("copy_last", "tokenizer", "mle", "rlvr", "mle_greedy", "rlvr_greedy") if n in mean]
        for i, name in enumerate(names):
            ax.bar(i, mean[name]["lpips"], color="0.7" if i < 2 else ("C0" if "mle" in name else "C1"))
            for seed in seeds:
                ax.plot(i, result["per_seed"][seed][name]["lpips"], "k.", ms=4)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
        ax.set_ylabel("LPIPS (lower is better)")
        ax.set_title(f"next frame, held-out clips (training seeds {', '.join(seeds)}: dots; bars: mean)", fontsize=9)
    elif part == "metrics":
        rewards = [r for r in REWARDS if r in mean]
        gains = [[relative_gain(mean[r], mean["mle"], m) for m in TABLE_METRICS] for r in rewards]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        limit = max(1e-9, max(abs(g) for row in gains for g in row))
        image = ax.imshow(gains, cmap="RdBu", vmin=-limit, vmax=limit)
        for i, row in enumerate(gains):
            for j, gain in enumerate(row):
                ax.text(j, i, f"{gain:+.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(TABLE_METRICS)), ["mae" if m == "l1" else m for m in TABLE_METRICS])
        ax.set_yticks(range(len(rewards)), rewards)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("RLVR reward")
        ax.set_title(f"% better than MLE (mean over training seeds {', '.join(seeds)})", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    elif part == "group_size":
        fig, ax = plt.subplots(figsize=(5, 3.2))
        sizes = [g for g in mean if g != "mle"]
        _seed_curves(ax, sizes, [result["per_seed"][seed] for seed in seeds], mean, "C1", "RLVR")
        ax.axhline(mean["mle"]["lpips"], color="C0", ls="--", label="MLE")
        _log2_axis(ax, sizes, "group size G (samples per prompt)")
    elif part == "best_of_n":
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for model, color in (("mle", "C0"), ("rlvr", "C1")):
            sizes = list(mean[model])
            _seed_curves(ax, sizes, [result["per_seed"][seed][model] for seed in seeds], mean[model], color,
                         model.upper())
        _log2_axis(ax, sizes, "N (best of the first N samples)")
    elif part == "multistep":
        fig, ax = plt.subplots(figsize=(5.6, 3.4))
        styles = {"copy_last": ("0.5", ":"), "tokenizer": ("0.7", ":"), "mle": ("C0", "-"), "rlvr": ("C1", "-"),
                  "mle_greedy": ("C0", "--"), "rlvr_greedy": ("C1", "--"), "mle_no_repeat": ("C2", "-."),
                  "rlvr_no_repeat": ("C3", "-.")}
        for name, (color, style) in styles.items():
            if name in mean:
                steps = range(1, len(mean[name]["lpips"]) + 1)
                ax.plot(steps, mean[name]["lpips"], style, color=color, marker="o", ms=3,
                        label=f"{name} (rep. {mean[name]['repetition_rate']:.1%})")
        ax.set_xlabel("prediction horizon (frames)")
        ax.set_ylabel("LPIPS (lower is better)")
        ax.set_xticks(list(steps))
        ax.legend(fontsize=6.5)
    if fig is not None:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# The README's tables
# ----------------------------------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _seed_columns(result: dict) -> list[str]:
    """With several seeds, one LPIPS column per seed beside the mean: a claim should hold on each."""
    return [f"lpips seed {seed}" for seed in result["per_seed"]] if len(result["per_seed"]) > 1 else []


def _per_seed(result: dict, name: str) -> list[str]:
    if len(result["per_seed"]) < 2:
        return []
    return [_number(runs[name]["lpips"]) for runs in result["per_seed"].values()]


def report(results_dir: Path, image_prefix: str = "") -> str:
    """The markdown block of the README from ``results_dir``'s JSON files (parts that are missing are left out)."""
    results_dir = Path(results_dir)
    loaded = {p: json.loads((results_dir / f"{p}.json").read_text())
              for p in ("default", *ALL_PARTS) if (results_dir / f"{p}.json").is_file()}
    lines = [BEGIN, "", "<!-- written by `rlvrw experiment report --readme README.md`; edit the runs, not this -->"]
    for part, result in loaded.items():
        seeds = ", ".join(str(s) for s in result["seeds"])
        lines += [""]
        if part == "default":
            lines += [f"The default run (`rlvrw train`), next frame on {result['clips']} held-out clips, training "
                      f"seeds {seeds}: LPIPS-VGG per seed (MLE and RLVR: the mean over their samples; `first`: the "
                      "first sample alone, as DESIGN's eval.json reports; greedy: the most likely token at every "
                      "step).", ""]
            names = [n for n in ("copy_last", "tokenizer", "mle", "rlvr", "mle_first", "rlvr_first", "mle_greedy",
                                 "rlvr_greedy") if n in result["mean"]]
            rows = [[name] + [_number(result["per_seed"][s][name]["lpips"]) for s in result["per_seed"]]
                    + [_number(result["mean"][name]["lpips"]),
                       _number(result["mean"][name]["l1"] + result["mean"][name]["lpips"])] for name in names]
            lines += _table(["row"] + [f"LPIPS seed {s}" for s in result["per_seed"]] + ["LPIPS mean",
                                                                                          "L1 + LPIPS mean"], rows)
        elif part == "metrics":
            lines += [f"Each metric as the RLVR reward (Fig. 4c), from the same MLE model, evaluated on every metric "
                      f"(mean over samples and seeds {seeds}; lower is better for MAE, MSE, LPIPS):", ""]
            rows = [[name] + [_number(result["mean"][name][m]) for m in TABLE_METRICS] + _per_seed(result, name)
                    for name in result["mean"]]
            lines += _table(["reward"] + ["mae" if m == "l1" else m for m in TABLE_METRICS] + _seed_columns(result),
                            rows)
        elif part == "group_size":
            lines += [f"Group size (Fig. 4b), reward -(L1 + LPIPS), seeds {seeds} (mean):", ""]
            rows = [[name if name == "mle" else f"G = {name}"]
                    + [_number(result["mean"][name][m]) for m in ("l1", "lpips")] + _per_seed(result, name)
                    for name in result["mean"]]
            lines += _table(["model", "mae", "lpips"] + _seed_columns(result), rows)
        elif part == "best_of_n":
            lines += [f"Best of N samples (Fig. 4a), LPIPS, seeds {seeds} (mean):", ""]
            sizes = list(result["mean"]["mle"])
            rows = [[model.upper()] + [_number(result["mean"][model][n]["lpips"]) for n in sizes]
                    for model in ("mle", "rlvr")]
            if len(result["per_seed"]) > 1:  # every claim on every seed, not only on the mean
                rows += [[f"{model.upper()} seed {seed}"] + [_number(runs[model][n]["lpips"]) for n in sizes]
                         for seed, runs in result["per_seed"].items() for model in ("mle", "rlvr")]
            lines += _table(["model"] + [f"N = {n}" for n in sizes], rows)
        elif part == "multistep":
            horizons = len(next(iter(result["mean"].values()))["lpips"])
            lines += [f"Multi-step prediction (`preset=multistep`, Table 3), seeds {seeds} (mean): LPIPS at each "
                      "predicted frame and the repetition rate (a predicted frame whose ids equal the previous "
                      "frame's); no_repeat: per clip the first sample that repeats no frame.", ""]
            by_seed = result["per_seed"] if len(result["per_seed"]) > 1 else {}  # the claim on each seed too

            def summary(row: dict) -> list[str]:
                return [_number(sum(row["lpips"]) / horizons), f"{row['repetition_rate']:.1%}"]

            rows = [[name] + [_number(v) for v in row["lpips"]] + summary(row)
                    + [cell for runs in by_seed.values() for cell in summary(runs[name])]
                    for name, row in result["mean"].items()]
            lines += _table(["row"] + [f"t = {t + 1}" for t in range(horizons)] + ["mean", "repetition"]
                            + [f"{column} seed {seed}" for seed in by_seed for column in ("mean", "repetition")], rows)
        if (results_dir / f"{part}.png").is_file():
            lines += ["", f"![{part}]({image_prefix}{part}.png)"]
    return "\n".join(lines + ["", END])


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the results markers (markers included) replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN} ... {END} block to fill")
    return text[:start] + block + text[end + len(END):]


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


def _run_cli(args: argparse.Namespace) -> int:
    from rlvrw.train.pipeline import parse_overrides, resolve_config

    # `--parts multistep key=value` : argparse gives the settings to --parts (nargs="*"); they are settings
    settings = [item for item in args.parts if "=" in item]
    parts = [item for item in args.parts if "=" not in item]
    try:
        config = resolve_config(overrides={"progress": False, **parse_overrides([*args.overrides, *settings])})
        unknown = sorted(set(parts) - set(ALL_PARTS))
        if unknown:
            raise ValueError(f"--parts must be among {list(ALL_PARTS)}, got {unknown}")
    except ValueError as err:
        print(f"rlvrw experiment run: error: {err}", file=sys.stderr)
        return 2
    run(config, Path(args.work_dir), Path(args.out), args.seeds, tuple(parts))
    print(report(Path(args.out)))
    return 0


def _report_cli(args: argparse.Namespace) -> int:
    readme = Path(args.readme) if args.readme else None
    prefix = ""
    if readme is not None:
        prefix = Path(args.results).resolve().relative_to(readme.resolve().parent).as_posix() + "/"
    block = report(Path(args.results), prefix)
    if readme is None:
        print(block)
        return 0
    text = readme.read_text()
    updated = replace_block(text, block)
    if args.check:
        if updated != text:
            print(f"{readme}'s results block differs from `rlvrw experiment report`'s output", file=sys.stderr)
            return 1
        return 0
    readme.write_text(updated)
    print(f"wrote the results block of {readme}")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("experiment", help="RLVR-World's Fig. 4 in miniature (reward metrics, group size, "
                                                      "best-of-N) and the README's result tables",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment_command", required=True)
    run_parser = sub.add_parser("run", help="train and evaluate every part for every seed; write JSON and PNGs")
    run_parser.add_argument("--work-dir", default="runs/experiment", help="where the runs go (reused when there)")
    run_parser.add_argument("--out", default="docs/results", help="where the JSON results and plots go")
    run_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    run_parser.add_argument("--parts", nargs="*", default=list(PARTS),
                            help=f"any of {list(ALL_PARTS)} (default: {list(PARTS)}; none: the default runs alone)")
    run_parser.add_argument("overrides", nargs="*", metavar="key=value", help="rlvrw train settings for every run")
    run_parser.set_defaults(func=_run_cli)
    report_parser = sub.add_parser("report", help="the README's results block from the JSON results")
    report_parser.add_argument("--results", default="docs/results", help="the directory `run` wrote")
    report_parser.add_argument("--readme", default=None, help="rewrite this file's results block (else print it)")
    report_parser.add_argument("--check", action="store_true", help="with --readme: exit 1 if the block differs")
    report_parser.set_defaults(func=_report_cli)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlvrw")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["experiment", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
