"""The README's first command: the self-check runs every op on every backend here and every error is small."""

import torch

from rlvrw import cli, selfcheck


def test_selfcheck_covers_every_op_and_passes():
    rows = selfcheck.run(repeats=1)
    ops_seen = {r["op"] for r in rows}
    assert ops_seen == {"token_logprobs", "linear_token_logprobs", "group_advantages", "grpo_loss",
                        "grpo_loss_from_logits", "frame_reward"}
    assert {r["backend"] for r in rows} >= {"reference", "triton"}
    bad = [r for r in rows if not r["ok"]]
    assert not bad, selfcheck.format_table(bad)
    assert all(r["max_rel_err"] >= 0 for r in rows)  # a NaN error would fail this


def test_selfcheck_flags_a_wrong_backend(monkeypatch):
    real = selfcheck.ops.grpo_loss

    def off_by_one_percent(*args, backend=None, **kwargs):
        loss, stats = real(*args, backend=backend, **kwargs)
        return (loss * 1.01 if backend != "reference" else loss), stats

    monkeypatch.setattr(selfcheck.ops, "grpo_loss", off_by_one_percent)
    rows = selfcheck.run(dtypes=(torch.float32,), repeats=1)
    flagged = {(r["op"], r["backend"]) for r in rows if not r["ok"]}
    assert flagged == {("grpo_loss", "triton")}


def test_cli_report(capsys):
    assert cli.main(["report"]) == 0
    assert "torch" in capsys.readouterr().out
