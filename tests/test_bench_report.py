"""bench/report.py on made-up runs: several sessions of one machine merge into one result, and the CUDA-vs-Triton race
is tabulated per shape with the automatic choice beside it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(group: str, impl: str, median: float, **info) -> dict:
    return {"name": f"test[{impl}]", "group": group, "stats": {"median": median, "iqr": 0.0, "rounds": 5},
            "extra_info": {"impl": impl, "device": "NVIDIA H100 80GB HBM3", "shape": group.split(": ")[1], **info}}


def session(benchmarks: list[dict], rates: dict | None, skipped=()) -> dict:
    return {"machine_info": {"rlvrw": {"cuda_available": True, "device": "NVIDIA H100 80GB HBM3"}},
            "datetime": "2026-12-06T10:00:00", "benchmarks": benchmarks, "rlvrw_skipped": list(skipped),
            "rlvrw_bench": {"device": "NVIDIA H100 80GB HBM3", "rounds": 5, "rates": rates}}


def test_sessions_merge_and_the_race_is_tabulated(tmp_path):
    report = load_report()
    rates = {"copy_gbps": 3000.0, "copy_bytes": 2**30, "matmul_tflops": 700.0, "matmul_dtype": "bfloat16",
             "matmul_size": 8192}
    grpo = session([bench("grpo_loss_from_logits: lm", "rlvrw", 2.0e-3, auto_backend="cuda"),
                    bench("grpo_loss_from_logits: lm", "rlvrw-triton", 2.5e-3),
                    bench("grpo_loss_from_logits: lm", "rlvrw-cuda", 2.0e-3),
                    bench("grpo_loss_from_logits: lm", "eager", 30e-3)], None,
                   skipped=[{"test": "bench/test_bench_grpo.py::test[liger]", "reason": "liger: not installed"}])
    fsq = session([bench("fsq_quantize: rl", "rlvrw", 1.0e-4, auto_backend="triton"),
                   bench("fsq_quantize: rl", "rlvrw-triton", 1.0e-4),
                   bench("fsq_quantize: rl", "rlvrw-cuda", 1.2e-4)], rates)
    paths = []
    for i, run in enumerate((grpo, fsq)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    json_path, md_path = report.write_report(paths, tmp_path / "out")
    assert json_path.name == "nvidia-h100-80gb-hbm3-2026-12-06.json"
    merged = json.loads(json_path.read_text())
    assert len(merged["benchmarks"]) == 7 and len(merged["rlvrw_skipped"]) == 1
    assert merged["rlvrw_bench"]["rates"] == rates and len(merged["rlvrw_sessions"]) == 2
    md = md_path.read_text()
    race = md.split("## CUDA vs Triton")[1].split("\n## ")[0]
    assert "| fsq_quantize: rl | 0.1 | 0.12 | triton | triton |" in race
    assert "| grpo_loss_from_logits: lm | 2.5 | 2 | cuda | cuda |" in race
    assert "15.00x" in md  # rlvrw vs eager in the grpo group
    assert "liger: not installed" in md
