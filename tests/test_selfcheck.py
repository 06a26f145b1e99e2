"""The README's first command: the self-check runs every op on every backend here and every error is small; a wrong
result, a wrong index, a NaN or an exception fails it, and ``rlvrw`` then exits non-zero."""

import math

import torch

from rlvrw import cli, selfcheck

EVERY_OP = {"token_logprobs", "linear_token_logprobs", "group_advantages", "grpo_loss", "grpo_loss_from_logits",
            "fsq_quantize", "fsq_codes_to_indices", "fsq_indices_to_codes", "fsq_dequantize", "group_norm_silu",
            "decode_fast", "l1_lpips_reward", "frame_reward"}


def test_selfcheck_covers_every_op_and_passes():
    rows = selfcheck.run(repeats=1)
    assert {r["op"] for r in rows} == EVERY_OP
    backends = {b for b, _ in selfcheck.available_backends()}
    assert backends >= {"reference", "triton"}
    for op in EVERY_OP:  # every op on every backend here that implements it, in both dtypes
        seen = {(r["backend"], r["dtype"]) for r in rows if r["op"] == op}
        assert {b for b, _ in seen} >= {"reference", "triton"}, op
        assert {d for _, d in seen} == {"float32", "bfloat16"}, op
    bad = [r for r in rows if not r["ok"]]
    assert not bad, selfcheck.format_table(bad)
    assert all(0 <= r["max_rel_err"] <= r["tolerance"] for r in rows)  # a NaN error would fail this
    assert all(r["tolerance"] <= 1e-4 for r in rows if r["dtype"] == "float32")


def test_selfcheck_flags_a_wrong_backend(monkeypatch):
    real = selfcheck.ops.grpo_loss

    def off_by_one_percent(*args, backend=None, **kwargs):
        loss, stats = real(*args, backend=backend, **kwargs)
        return (loss * 1.01 if backend != "reference" else loss), stats

    monkeypatch.setattr(selfcheck.ops, "grpo_loss", off_by_one_percent)
    rows = selfcheck.run(dtypes=(torch.float32,), repeats=1, only={"grpo_loss", "group_advantages"})
    flagged = {(r["op"], r["backend"]) for r in rows if not r["ok"]}
    assert flagged == {("grpo_loss", "triton")}


def test_selfcheck_flags_a_wrong_index_a_nan_and_an_exception(monkeypatch):
    ops = selfcheck.ops
    real_quantize, real_norm, real_codes = ops.fsq_quantize, ops.group_norm_silu, ops.fsq_indices_to_codes

    def one_index_off(z, levels, backend=None):
        codes, indices = real_quantize(z, levels, backend=backend)
        if backend == "triton":
            indices = indices.clone()
            indices.view(-1)[7] += 1
        return codes, indices

    def one_nan(x, *args, backend=None, **kwargs):
        y = real_norm(x, *args, backend=backend, **kwargs)
        return y.index_fill(0, torch.tensor([1]), float("nan")) if backend == "triton" else y

    def broken(*args, backend=None, **kwargs):
        if backend == "triton":
            raise RuntimeError("no kernel")
        return real_codes(*args, backend=backend, **kwargs)

    monkeypatch.setattr(ops, "fsq_quantize", one_index_off)
    monkeypatch.setattr(ops, "group_norm_silu", one_nan)
    monkeypatch.setattr(ops, "fsq_indices_to_codes", broken)
    rows = selfcheck.run(dtypes=(torch.float32,), repeats=1,
                         only={"fsq_quantize", "group_norm_silu", "fsq_indices_to_codes"})
    by_op = {r["op"]: r for r in rows if r["backend"] == "triton"}
    assert math.isinf(by_op["fsq_quantize"]["max_rel_err"]) and "1 of 111 integer outputs differ" in \
        by_op["fsq_quantize"]["error"]
    assert math.isnan(by_op["group_norm_silu"]["max_rel_err"])
    assert by_op["fsq_indices_to_codes"]["error"] == "RuntimeError: no kernel"
    assert not any(r["ok"] for r in by_op.values())
    assert all(r["ok"] for r in rows if r["backend"] == "reference")


def test_rlvrw_with_no_arguments_exits_nonzero_on_a_failure(monkeypatch, capsys):
    bad = dict(op="fsq_quantize", backend="triton", device="cpu", dtype="float32", tolerance=1e-4,
               max_rel_err=2e-3, ms=1.0, ok=False)
    monkeypatch.setattr(selfcheck, "run", lambda: [bad])
    assert cli.main([]) == 1
    assert "0 passed, 1 failed" in capsys.readouterr().out
    monkeypatch.setattr(selfcheck, "run", lambda: [{**bad, "max_rel_err": 1e-6, "ok": True}])
    assert cli.main([]) == 0


def test_cli_report(capsys):
    assert cli.main(["report"]) == 0
    assert "torch" in capsys.readouterr().out
