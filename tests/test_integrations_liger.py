"""rlvrw.integrations.liger.LigerFusedLinearGRPOLoss against Liger-Kernel 0.8.5's own class: the same constructor
and call give the same loss, metrics and gradients of the hidden states, weight and bias. Inputs are float64; Liger
computes in float32 (its log-probs and loss math), hence the tolerance. Our side gets garbage at masked positions."""

import pytest
import torch
from test_grpo_peers import make_batch, poisoned

from rlvrw.integrations.liger import LigerFusedLinearGRPOLoss

TOL = dict(rtol=2e-5, atol=1e-6)
B, T, H, V = 4, 6, 16, 97

CASES = {  # constructor arguments, and what the call passes beyond the hidden states, weight, tokens, mask, advantages
    "grpo": (dict(loss_type="grpo"), dict(old=True, ref="logps")),
    "bnpo-sequence-is": (dict(loss_type="bnpo", importance_sampling_level="sequence"),
                         dict(old=True, ref="logps", is_ratio="sequence")),
    "dr_grpo-bias-delta": (dict(loss_type="dr_grpo", max_completion_length=10, delta=1.5), dict(old=True, ref="logps",
                                                                                                bias=True)),
    "dapo-is-items": (dict(loss_type="dapo"), dict(old=True, ref="logps", is_ratio="token", num_items=40)),
    "dapo-on-policy-ref-model": (dict(loss_type="dapo"), dict(old=False, ref="model", bias=True)),
    "luspo-sequence": (dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0, use_ref_model=False),
                       dict(old=True)),
    "grpo-no-ref-model": (dict(loss_type="grpo", use_ref_model=False), dict(old=True)),
    "bnpo-ratio-weighted-kl": (dict(loss_type="bnpo", use_bias_correction_kl=True), dict(old=True, ref="logps")),
    "grpo-sequence-ratio-weighted-kl-on-policy": (
        dict(loss_type="grpo", importance_sampling_level="sequence", use_bias_correction_kl=True),
        dict(old=False, ref="logps")),
}


def inputs(call, seed=0):
    batch = make_batch(B=B, T=T, spread=0.3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = {
        "hidden": torch.randn(B, T, H, dtype=torch.float64, generator=g),
        "weight": torch.randn(V, H, dtype=torch.float64, generator=g) / 4,
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "mask": batch["mask"], "advantages": batch["advantages"],
        # Liger rounds these to float32: float32 values, so that both sides see the same numbers
        "old": batch["old_logp"].float().double() if call.get("old") else None,
        "ref": batch["ref_logp"].float().double() if call.get("ref") == "logps" else None,
        "bias": torch.randn(V, dtype=torch.float64, generator=g) if call.get("bias") else None,
    }
    if call.get("ref") == "model":
        x["ref_input"] = x["hidden"] + 0.1 * torch.randn(B, T, H, dtype=torch.float64, generator=g)
        x["ref_weight"] = x["weight"] + 0.05 * torch.randn(V, H, dtype=torch.float64, generator=g)
        x["ref_bias"] = x["bias"]
    if call.get("is_ratio"):
        shape = (B, T) if call["is_ratio"] == "token" else (B, 1)
        x["is_ratio"] = torch.exp(0.2 * torch.randn(shape, dtype=torch.float64, generator=g)).clamp(max=1.3)
    return x


def run(cls, options, x, garbage):
    """(loss, metrics, d hidden, d weight, d bias) of ``cls(**options)`` on ``x``."""
    mask = x["mask"]
    dirty = (lambda t: None if t is None else poisoned(t, mask)) if garbage else (lambda t: t)
    hidden, weight = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    bias = None if x["bias"] is None else x["bias"].clone().requires_grad_(True)
    is_ratio = x.get("is_ratio")
    if garbage and is_ratio is not None and is_ratio.shape[1] == T:
        is_ratio = poisoned(is_ratio, mask)
    loss_fn = cls(temperature=0.8, epsilon_low=0.2, epsilon_high=0.28, compiled=False, **{"beta": 0.04, **options})
    loss, metrics = loss_fn(hidden, weight, x["tokens"], mask.long(), x["advantages"], bias=bias,
                            ref_per_token_logps=dirty(x["ref"]), old_per_token_logps=dirty(x["old"]),
                            ref_input=x.get("ref_input"), ref_weight=x.get("ref_weight"), ref_bias=x.get("ref_bias"),
                            vllm_is_ratio=is_ratio, num_items_in_batch=x.get("num_items"))
    loss.backward()
    return loss.detach().double(), [m.double() for m in metrics], hidden.grad, weight.grad, \
        None if bias is None else bias.grad


@pytest.mark.parametrize("case", list(CASES))
def test_equals_liger(case):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    options, call = CASES[case]
    x = inputs(call)
    x["num_items"] = call.get("num_items")
    expected = run(chunked.LigerFusedLinearGRPOLoss, options, x, garbage=False)
    got = run(LigerFusedLinearGRPOLoss, options, x, garbage=True)
    torch.testing.assert_close(got[0], expected[0], **TOL, msg="loss")
    assert len(got[1]) == len(expected[1])
    for i, (a, b) in enumerate(zip(got[1], expected[1])):
        torch.testing.assert_close(a, b, **TOL, msg=f"metric {i}")
    for name, a, b in zip(("d hidden", "d weight", "d bias"), got[2:], expected[2:]):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, **TOL, msg=name)
    assert got[2][~x["mask"]].abs().max() == 0  # masked positions get no gradient


def test_unsupported_settings_are_refused():
    for options, word in ((dict(loss_type="cispo"), "loss_type"), (dict(loss_type="sapo"), "loss_type"),
                          (dict(importance_sampling_level="sentence"), "importance_sampling_level"),
                          (dict(delta=1.1, epsilon_high=0.28), "delta"), (dict(loss_type="dr_grpo"),
                                                                          "max_completion_length"),
                          (dict(temperature=0), "temperature")):
        with pytest.raises(ValueError, match=word):
            LigerFusedLinearGRPOLoss(**options)
    x = inputs({"old": True, "ref": "logps"})
    loss_fn = LigerFusedLinearGRPOLoss(importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="vllm_is_ratio"):  # per-token ratios with sequence-level sampling
        loss_fn(x["hidden"], x["weight"], x["tokens"], x["mask"], x["advantages"], ref_per_token_logps=x["ref"],
                vllm_is_ratio=torch.ones(B, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        LigerFusedLinearGRPOLoss()(x["hidden"], x["weight"], x["tokens"], x["mask"], x["advantages"])


def test_under_autocast_the_head_keeps_the_weights_dtype():
    """Called under bf16 autocast (as from a trainer's mixed-precision forward) with float32 weights: the same loss
    and gradients as without autocast."""
    options, call = CASES["dr_grpo-bias-delta"]
    x = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs(call).items()}
    expected = run(LigerFusedLinearGRPOLoss, options, x, garbage=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(LigerFusedLinearGRPOLoss, options, x, garbage=True)
    for a, b in zip([got[0], *got[1], *got[2:]], [expected[0], *expected[1], *expected[2:]]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
