"""Turn a pytest-benchmark run of bench/ into a committed result: ``<out>/<device>-<yyyy-mm-dd>.json`` and ``.md``.

    python bench/report.py RUN.json [--out bench/results]        # RUN.json from pytest --benchmark-json=RUN.json
    python bench/report.py RUN1.json RUN2.json ...                # several sessions of one machine, as one result
    python bench/report.py --run [--out bench/results] [-- PYTEST_ARGS...]   # run the suite, then report

The JSON is the pytest-benchmark output as is, with ``rlvrw.ops.report()`` under ``machine_info.rlvrw`` (bench's
conftest puts it there; it is added here when missing) and the session's settings and device rates under
``rlvrw_bench``. The markdown has a table per benchmark group and a list of the targets from bench/README.md with
what this run measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"

EAGER = "eager"  # the baseline of the speedup and memory columns: VERL-style eager PyTorch


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _rlvrw_report() -> dict:
    if importlib.util.find_spec("rlvrw") is None:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from rlvrw.ops import report

        return report()
    except Exception as err:
        return {"report_error": f"{type(err).__name__}: {err}"}


def bench_info_of(run: dict) -> dict:
    """The session's settings and device rates (under ``machine_info`` in runs made before they moved out of it)."""
    return run.get("rlvrw_bench") or run.get("machine_info", {}).get("rlvrw_bench") or {}


def device_of(run: dict) -> str:
    bench_info = bench_info_of(run)
    if bench_info.get("device"):
        return bench_info["device"]
    for bench in run.get("benchmarks", []):
        if bench.get("extra_info", {}).get("device"):
            return bench["extra_info"]["device"]
    return str(run.get("machine_info", {}).get("rlvrw", {}).get("device", "unknown"))


def date_of(run: dict) -> str:
    stamp = run.get("datetime")
    if stamp:
        try:
            return dt.datetime.fromisoformat(stamp).date().isoformat()
        except ValueError:
            pass
    return dt.date.today().isoformat()


# ---- formatting -----------------------------------------------------------------------------------------------------
def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _median(bench: dict):
    return bench.get("stats", {}).get("median")


def groups_of(run: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for bench in run.get("benchmarks", []):
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    order = ["rlvrw", "rlvrw-triton", "rlvrw-cuda", "eager", "eager-trl", "liger"]

    def key(b):
        impl = b.get("extra_info", {}).get("impl", "")
        return (order.index(impl) if impl in order else len(order), impl)

    return {name: sorted(rows, key=key) for name, rows in sorted(groups.items())}


def _find(rows: list[dict], impl: str) -> dict | None:
    for row in rows:
        if row.get("extra_info", {}).get("impl") == impl:
            return row
    return None


def speedup(rows, row, versus=EAGER):
    """Time of ``versus`` in the same group over time of ``row`` (None when either is missing)."""
    other = _find(rows, versus)
    if other is None or not _median(row) or not _median(other):
        return None
    return _median(other) / _median(row)


def memory_saving(rows, row, versus=EAGER):
    other = _find(rows, versus)
    mine = row.get("extra_info", {}).get("peak_mem_bytes")
    theirs = other.get("extra_info", {}).get("peak_mem_bytes") if other else None
    if not mine or not theirs:
        return None
    return theirs / mine


def group_table(rows: list[dict]) -> list[str]:
    lines = [
        "| impl | shape | median ms | IQR ms | rounds | speedup vs eager | peak mem | eager mem / mem | achieved | "
        "of device |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        info, stats = row.get("extra_info", {}), row.get("stats", {})
        if info.get("achieved_gbps") is not None:
            achieved = f"{info['achieved_gbps']:.1f} GB/s"
            of_device = f"{_pct(info.get('fraction_of_copy_bw'))} of copy"
        elif info.get("achieved_tflops") is not None:
            achieved = f"{info['achieved_tflops']:.3g} TFLOP/s"
            of_device = f"{_pct(info.get('fraction_of_matmul'))} of {info.get('matmul_dtype', '')} matmul"
        else:
            achieved = of_device = "-"
        shape = info.get("shape", "-")
        if info.get("passes") and info["passes"] != "fwd+bwd":
            shape += f" ({info['passes']})"
        lines.append(
            f"| {info.get('impl', row['name'])} | {shape} | {_ms(stats.get('median'))} | {_ms(stats.get('iqr'))} | "
            f"{stats.get('rounds', '-')} | {_ratio(speedup(rows, row))} | {_bytes(info.get('peak_mem_bytes'))} | "
            f"{_ratio(memory_saving(rows, row))} | {achieved} | {of_device} |"
        )
    return lines


def race_table(groups: dict[str, list[dict]]) -> list[str]:
    """One row per group that timed both ``rlvrw-triton`` and ``rlvrw-cuda``."""
    lines = ["| group | triton ms | cuda ms | faster | automatic choice |", "|---|---:|---:|---|---|"]
    for name, rows in groups.items():
        triton, cuda, auto = _find(rows, "rlvrw-triton"), _find(rows, "rlvrw-cuda"), _find(rows, "rlvrw")
        if triton is None or cuda is None or not _median(triton) or not _median(cuda):
            continue
        faster = "cuda" if _median(cuda) < _median(triton) else "triton"
        chosen = (auto or {}).get("extra_info", {}).get("auto_backend") or "-"
        lines.append(f"| {name.replace('|', '/')} | {_ms(_median(triton))} | {_ms(_median(cuda))} | {faster} | "
                     f"{chosen} |")
    return lines if len(lines) > 2 else []


def _status(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def targets(groups: dict[str, list[dict]], on_gpu: bool) -> list[str]:
    """The targets of README.md checked against this run (impl ``rlvrw``: the automatic backend). GPU targets on GPU
    runs; on CPU runs the one CPU claim: the reference path is not slower than the eager VERL-style computation."""
    lines = ["| target | group | measured | status |", "|---|---|---:|---|"]
    for name, rows in groups.items():
        op = rows[0].get("extra_info", {}).get("op")
        ours = _find(rows, "rlvrw")
        if ours is None:
            continue
        info = ours["extra_info"]
        checks = []
        if on_gpu and op == "grpo_loss_from_logits":
            frac = info.get("fraction_of_copy_bw")
            floor_ratio = 1 / frac if frac else None
            vs_liger, vs_eager, mem = speedup(rows, ours, "liger"), speedup(rows, ours), memory_saving(rows, ours)
            checks += [
                ("fwd+bwd time within 1.25x of the 3-pass memory floor",
                 f"{floor_ratio:.2f}x of floor" if floor_ratio else "-",
                 None if floor_ratio is None else floor_ratio <= 1.25),
                (">= 1.3x faster than Liger's Triton GRPO loss", _ratio(vs_liger),
                 None if vs_liger is None else vs_liger >= 1.3),
                (">= 8x faster than eager VERL-style", _ratio(vs_eager), None if vs_eager is None else vs_eager >= 8),
                (">= 4x less peak memory than eager VERL-style", _ratio(mem), None if mem is None else mem >= 4),
            ]
        if on_gpu and op == "linear_token_logprobs":
            frac = info.get("fraction_of_matmul")
            checks.append(
                (f">= 60% of the measured {info.get('matmul_dtype', '')} matmul rate (8NHV flops)", _pct(frac),
                 None if frac is None else frac >= 0.6)
            )
        if not on_gpu and _find(rows, EAGER) is not None:
            vs_eager = speedup(rows, ours)
            checks.append(
                ("CPU: rlvrw (reference path) not slower than eager VERL-style: eager time / rlvrw time >= 1",
                 _ratio(vs_eager), None if vs_eager is None else vs_eager >= 1)
            )
        for what, measured, ok in checks:
            lines.append(f"| {what} | {name.replace('|', '/')} | {measured} | {_status(ok)} |")
    if not on_gpu:
        lines += ["", "The GPU targets (memory floor, Liger, eager speed and memory, matmul rate) are checked on GPU "
                  "runs only."]
    return lines


def markdown(run: dict, device: str, date: str) -> str:
    machine = run.get("machine_info", {})
    rl = machine.get("rlvrw", {})
    bench_info = bench_info_of(run)
    rates = bench_info.get("rates") or {}
    on_gpu = bool(rl.get("cuda_available")) and device != "cpu"
    out = [f"# rlvrw benchmarks: {device}, {date}", ""]
    facts = [
        f"rlvrw {rl.get('rlvrw', '?')}",
        f"torch {rl.get('torch', '?')}",
        f"triton {rl.get('triton', '?')}",
        f"CUDA extension: {rl.get('cuda_extension', '?')}",
        f"python {rl.get('python', machine.get('python_version', '?'))}",
    ]
    if not on_gpu:
        cpu = machine.get("cpu", {})
        facts.append(f"CPU: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores")
        facts.append(f"torch threads {bench_info.get('torch_threads', '?')}")
    out.append("; ".join(facts) + ".")
    out.append("")
    if bench_info:
        out.append(
            f"Logits dtype {bench_info.get('dtype', '?')}; shapes "
            f"{'full' if bench_info.get('full_shapes') else 'scaled down for CPU'}; "
            f"{bench_info.get('rounds', '?')} timed rounds after 1 warm-up round (more for group_advantages)."
        )
    if rates:
        out.append(
            f"Measured on this device: copy bandwidth {rates['copy_gbps']:.1f} GB/s (bytes read + written by a "
            f"{_bytes(rates.get('copy_bytes'))} device-to-device copy), {rates['matmul_dtype']} matmul "
            f"{rates['matmul_tflops']:.3g} TFLOP/s ({rates.get('matmul_size')}^3)."
        )
    out += [
        "",
        "Times are the median of fwd+bwd per round (group_advantages: forward only). 'speedup vs eager' = eager "
        "median / this median (eager = VERL-style eager PyTorch). 'peak mem' = peak allocated during one fwd+bwd, "
        "inputs and gradients included (GPU only). 'achieved' = memory floor (3 x N x V x element size: the logits "
        "read twice, d(logits) written once) or 8 x N x H x V flops, divided by the median time.",
        "",
        "## Targets",
        "",
        *targets(groups_of(run), on_gpu),
        "",
    ]
    race = race_table(groups_of(run))
    if race:
        out += ["## CUDA vs Triton", "",
                "Per shape, the two backends' medians, and which one the automatic choice (impl `rlvrw`) ran: it "
                "times both once per size class on first use and keeps the faster.", "", *race, ""]
    for name, rows in groups_of(run).items():
        out += [f"## {name}", "", *group_table(rows), ""]
    skipped = run.get("rlvrw_skipped") or []
    if skipped:
        out += ["## Not run", ""]
        out += [f"- `{s['test'].split('::')[-1]}`: {s['reason']}" for s in skipped]
        out.append("")
    return "\n".join(out)


def merge_runs(runs: list[dict]) -> dict:
    """Several pytest-benchmark sessions of one machine (e.g. one per stage of bench/gpu_campaign.sh) as one run:
    their benchmarks and skips together; the first session's settings and device rates (each benchmark keeps the
    rates it was measured against in its extra_info), and every session's under ``rlvrw_sessions``."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0])
    merged["benchmarks"] = [b for run in runs for b in run.get("benchmarks", [])]
    merged["rlvrw_skipped"] = [s for run in runs for s in run.get("rlvrw_skipped", [])]
    sessions = [bench_info_of(run) for run in runs]
    merged["rlvrw_bench"] = next((s for s in sessions if s.get("rates")), sessions[0])
    merged["rlvrw_sessions"] = sessions
    return merged


def write_report(run_paths: list[Path], out_dir: Path) -> tuple[Path, Path]:
    run = merge_runs([json.loads(Path(path).read_text()) for path in run_paths])
    machine = run.setdefault("machine_info", {})
    if "rlvrw" not in machine:
        machine["rlvrw"] = _rlvrw_report()
    device, date = device_of(run), date_of(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(device)}-{date}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(run, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown(run, device, date))
    return json_path, md_path


def run_suite(json_path: Path, pytest_args: list[str]) -> int:
    env = dict(os.environ)
    if importlib.util.find_spec("rlvrw") is None:  # not installed: run from the checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR), "--benchmark-only", f"--benchmark-json={json_path}"]
    cmd += pytest_args
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO_ROOT, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_json", nargs="*", type=Path,
                        help="pytest --benchmark-json files of bench/ (several: sessions of one machine, merged)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--run", action="store_true", help="run pytest bench/ --benchmark-only first")
    args = parser.parse_args(argv)
    rc = 0
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            run_json = Path(tmp) / "run.json"
            rc = run_suite(run_json, pytest_args)
            if not run_json.exists():
                print(f"pytest exited with {rc} and wrote no benchmark JSON", file=sys.stderr)
                return rc or 1
            paths = write_report([run_json], args.out)
    else:
        if not args.run_json:
            parser.error("give RUN.json, or --run")
        paths = write_report(args.run_json, args.out)
    for path in paths:
        print("wrote", path)
    return rc


if __name__ == "__main__":
    sys.exit(main())
