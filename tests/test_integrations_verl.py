"""rlvrw.integrations.verl against VERL 0.9.1's own functions, in float64: the registered policy losses through VERL's
``get_policy_loss_fn`` equal ``compute_policy_loss_vanilla`` / ``_gspo`` (loss, gradient, metrics) with fully masked
rows and garbage at masked positions on our side; the fused log-prob + entropy equals VERL's logits path and its
torch fused kernel, and plugged into VERL's fused-kernel model forward gives the model's own log-probs."""

import math

import pytest
import torch
from test_grpo_peers import make_batch, poisoned

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
rlvrw_verl = pytest.importorskip("rlvrw.integrations.verl")
from verl.utils import torch_functional as verl_F  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

TOL = dict(rtol=1e-7, atol=1e-10)
AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
BATCH_INFO = {  # as VERL's ppo_loss fills ActorConfig.global_batch_info
    "local": {},
    "global": {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 13, "loss_scale_factor": None},
    "scaled": {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": 64},
}


def actor_config(clip_ratio=0.2, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, **batch_info):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=clip_ratio,
                         clip_ratio_low=clip_low, clip_ratio_high=clip_high, clip_ratio_c=clip_ratio_c)
    config.global_batch_info.update(batch_info)
    return config


def run(loss_mode, batch, config, agg, device, weights=None, garbage=False):
    """(loss, d loss / d log_prob, metrics) of the registered loss ``loss_mode``, called as VERL's actor calls it."""
    mask = batch["mask"].to(device)
    move = (lambda t: poisoned(t, batch["mask"]).to(device)) if garbage else (lambda t: t.clone().to(device))
    logp = move(batch["logp"]).requires_grad_(True)
    advantages = batch["advantages"][:, None] * batch["mask"]  # VERL's (B, T) layout
    loss, metrics = core_algos.get_policy_loss_fn(loss_mode)(
        old_log_prob=move(batch["old_logp"]), log_prob=logp, advantages=move(advantages), response_mask=mask,
        loss_agg_mode=agg, config=config, rollout_is_weights=None if weights is None else move(weights),
    )
    loss.backward()
    return loss.detach().cpu(), logp.grad.cpu(), metrics


def assert_metrics_close(ours, theirs):
    assert set(ours) == set(theirs) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    for name, value in theirs.items():
        assert isinstance(ours[name], float) and math.isclose(ours[name], value, rel_tol=1e-7, abs_tol=1e-12), name


def backend_device(backend, kernel_device, monkeypatch):
    monkeypatch.setenv("RLVRW_BACKEND", backend)
    return "cpu" if backend == "reference" else kernel_device


@pytest.mark.parametrize("info", list(BATCH_INFO))
@pytest.mark.parametrize("agg", AGGS)
def test_rlvrw_grpo_equals_vanilla(agg, info, monkeypatch):
    """Every loss_agg_mode with VERL's global batch info, rollout correction weights, fully masked rows."""
    monkeypatch.setenv("RLVRW_BACKEND", "reference")
    batch = make_batch(B=7, T=9)
    weights = torch.exp(0.3 * torch.randn_like(batch["logp"])).clamp(max=2.0) if info == "global" else None
    config = actor_config(**BATCH_INFO[info])
    expected = run("vanilla", batch, config, agg, "cpu", weights)
    loss, grad, metrics = run("rlvrw_grpo", batch, config, agg, "cpu", weights, garbage=True)
    torch.testing.assert_close(loss, expected[0], **TOL)
    torch.testing.assert_close(grad, expected[1], **TOL)
    assert torch.isfinite(grad).all() and (grad[~batch["mask"]] == 0).all()
    assert_metrics_close(metrics, expected[2])
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0  # both clips were exercised


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("clips", [dict(clip_ratio=0.3, clip_low=None, clip_high=None, clip_ratio_c=2.0),
                                   dict(clip_low=0.1, clip_high=0.4, clip_ratio_c=10.0)])
def test_rlvrw_grpo_honours_the_clip_ratios(clips, backend, kernel_device, monkeypatch):
    """clip_ratio_low / _high, their fallback to clip_ratio, clip_ratio_c; on each backend."""
    device = backend_device(backend, kernel_device, monkeypatch)
    batch = make_batch(B=5, T=6, spread=1.5, seed=3)
    config = actor_config(**clips)
    expected = run("vanilla", batch, config, "token-mean", "cpu")
    loss, grad, metrics = run("rlvrw_grpo", batch, config, "token-mean", device, garbage=True)
    torch.testing.assert_close(loss, expected[0], **TOL)
    torch.testing.assert_close(grad, expected[1], **TOL)
    assert_metrics_close(metrics, expected[2])


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_rlvrw_gspo_equals_gspo(agg, monkeypatch):
    monkeypatch.setenv("RLVRW_BACKEND", "reference")
    batch = make_batch(B=6, T=8, spread=0.3, seed=1)
    batch["old_logp"][2] += 3.0  # a sequence ratio far below 1
    config = actor_config(clip_low=3e-4, clip_high=4e-4, dp_size=2, global_batch_size=9, batch_num_tokens=40)
    expected = run("gspo", batch, config, agg, "cpu")
    loss, grad, metrics = run("rlvrw_gspo", batch, config, agg, "cpu", garbage=True)
    torch.testing.assert_close(loss, expected[0], **TOL)
    torch.testing.assert_close(grad, expected[1], **TOL)
    assert_metrics_close(metrics, expected[2])


def test_bad_calls_say_what_is_wrong():
    batch = make_batch(B=2, T=3)
    with pytest.raises(ValueError, match="config"):
        run("rlvrw_grpo", batch, None, "token-mean", "cpu")
    with pytest.raises(ValueError, match="global_batch_size"):  # as VERL: a global count with dp_size > 1
        run("rlvrw_grpo", batch, actor_config(dp_size=2), "seq-mean-token-mean", "cpu")
    with pytest.raises(ValueError, match="loss_agg"):
        run("rlvrw_grpo", batch, actor_config(), "token-average", "cpu")
    h, w = torch.randn(4, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="reduction"):
        rlvrw_verl.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), 1.0, "mean")


def verl_logits_path(hidden, weight, labels, temperature):
    """VERL's actor without fused kernels: logits, then logprobs_from_logits and entropy_from_logits."""
    logits = (hidden @ weight.t()) / temperature
    return verl_F.logprobs_from_logits(logits, labels), verl_F.entropy_from_logits(logits)


def grads_of(fn, hidden, weight, labels, temperature, upstream):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = fn(h, w, labels, temperature)
    ((logp * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(3, 5), (13,)], ids=["BT", "N"])
def test_linear_cross_entropy_equals_the_logits_path(shape, backend, kernel_device, monkeypatch):
    """Log-probs, entropies and the gradients of hidden and weight through both outputs; a vocabulary of 301."""
    device = backend_device(backend, kernel_device, monkeypatch)
    H, V, temperature = 24, 301, 0.7
    hidden = torch.randn(*shape, H, dtype=torch.float64, device=device)
    weight = torch.randn(V, H, dtype=torch.float64, device=device) / 3
    labels = torch.randint(0, V, shape, device=device)
    upstream = (torch.randn(shape, dtype=torch.float64, device=device),
                torch.randn(shape, dtype=torch.float64, device=device))
    expected = grads_of(verl_logits_path, hidden, weight, labels, temperature, upstream)
    got = grads_of(rlvrw_verl.linear_cross_entropy, hidden, weight, labels, temperature, upstream)
    for name, a, b in zip(("log_probs", "entropy", "d hidden", "d weight"), got, expected):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_linear_cross_entropy_equals_verl_fused_torch_kernel():
    """VERL's FusedLinearForPPO (its torch backend of use_fused_kernels), float32, same outputs and gradients."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    B, T, H, V, temperature = 2, 7, 16, 200, 1.3
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) / 3
    labels = torch.randint(0, V, (B, T))
    upstream = (torch.randn(B, T), torch.randn(B, T))
    expected = grads_of(lambda h, w, x, t: FusedLinearForPPO(chunk_size=5).forward(h, w, x, t),
                        hidden, weight, labels, temperature, upstream)
    got = grads_of(rlvrw_verl.linear_cross_entropy, hidden, weight, labels, temperature, upstream)
    for name, a, b in zip(("log_probs", "entropy", "d hidden", "d weight"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_use_fused_kernels_plugs_into_verl_model_forward(monkeypatch):
    """VERL's fused-kernel forward of a Hugging Face Llama (dense_common.forward_with_triton_backend) then calls
    rlvrw: its log-probs and entropies equal those of the model's own logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from verl.models.transformers import dense_common
    from verl.utils.kernel import linear_cross_entropy as kernel_module

    monkeypatch.setattr(kernel_module, "linear_cross_entropy", kernel_module.linear_cross_entropy)  # restored after
    rlvrw_verl.use_fused_kernels()
    assert kernel_module.linear_cross_entropy is rlvrw_verl.linear_cross_entropy
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).double().eval()
    input_ids = torch.randint(0, 97, (2, 9))
    out = dense_common.forward_with_triton_backend(model, input_ids=input_ids, return_dict=True, temperature=0.8)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    expected_logp, expected_entropy = verl_logits_path(logits, torch.eye(97, dtype=torch.float64),
                                                       torch.roll(input_ids, -1, dims=-1), 0.8)
    torch.testing.assert_close(out.log_probs.detach(), expected_logp, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out.entropy.detach(), expected_entropy, rtol=1e-9, atol=1e-11)


def test_linear_cross_entropy_under_autocast():
    """VERL runs its model forward under bf16 autocast: the head then computes in its inputs' dtype (as VERL's
    kernel does), forward and backward alike, and equals the float32 logits path."""
    hidden, weight = torch.randn(2, 5, 16), torch.randn(97, 16) / 3
    labels = torch.randint(0, 97, (2, 5))
    upstream = (torch.randn(2, 5), torch.randn(2, 5))
    expected = grads_of(verl_logits_path, hidden, weight, labels, 0.9, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads_of(rlvrw_verl.linear_cross_entropy, hidden, weight, labels, 0.9, upstream)
    for name, a, b in zip(("log_probs", "entropy", "d hidden", "d weight"), got, expected):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
