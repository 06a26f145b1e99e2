"""The GRPO family against the peers' own code, in float64: VERL 0.9.1, TRL 1.16, Liger-Kernel 0.8.5 (installed by the
test extras), and OpenRLHF 0.11's ``PolicyLoss``.

OpenRLHF does not install on CPU (it pins flash-attn, which builds only with CUDA, deepspeed, and
transformers==5.15 where VERL needs < 5.11): ``openrlhf_policy_loss`` below states its ``PolicyLoss.forward`` as its
source reads (openrlhf/models/loss.py), and is checked against the real class where it imports.

Every comparison: loss and gradient within 1e-7 relative (VERL and OpenRLHF divide by counts + 1e-8), with fully
masked rows, and with garbage (inf, -inf, NaN) at masked positions on our side only (the peer gets clean inputs), on
the reference and the Triton backend (interpreted on CPU tensors without a GPU, compiled on CUDA tensors with one; the
peers and the reference run on the CPU).
"""

import collections
import math
import types

import pytest
import torch

import rlvrw.ops as ops

BACKENDS = ["reference", "triton"]
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-7, atol=1e-10)
LIGER_TOL = dict(rtol=1e-5, atol=1e-7)  # Liger's loss math is float32 whatever the input dtype


@pytest.fixture(scope="module")
def verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.trainer.ppo import rollout_corr_helper
    from verl.utils import torch_functional
    from verl.workers.config import ActorConfig

    return types.SimpleNamespace(algos=core_algos, corr=rollout_corr_helper, F=torch_functional, ActorConfig=ActorConfig)


def make_batch(B=6, T=11, spread=1.0, seed=0):
    """fp64 log-probs; rows 1 and B-1 fully masked; every other row has its first token."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, dtype=torch.float64, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[1] = mask[B - 1] = False
    return {
        "logp": logp,
        "old_logp": logp + spread * torch.randn(B, T, dtype=torch.float64, generator=g),
        "ref_logp": logp + spread * torch.randn(B, T, dtype=torch.float64, generator=g),
        "advantages": torch.randn(B, dtype=torch.float64, generator=g),
        "mask": mask,
    }


def poisoned(t, mask):
    """``t`` with inf, -inf and NaN at the masked positions."""
    garbage = torch.tensor([math.inf, -math.inf, math.nan], dtype=t.dtype, device=t.device)
    fill = garbage[torch.arange(mask.numel(), device=t.device) % 3].view(mask.shape)
    return torch.where(mask, t, fill)


def device_of(backend: str) -> str:
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def ours(batch, backend, weights=None, **options):
    """Our loss and d(loss)/d(logp), with garbage at every masked position of every input; results on the CPU."""
    device = device_of(backend)
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch["mask"]
    logp = poisoned(batch["logp"], mask).requires_grad_(True)
    if weights is not None:
        weights = weights.to(device)
        weights = poisoned(weights, mask) if weights.dim() == 2 else weights
    loss, stats = ops.grpo_loss(
        logp, poisoned(batch["old_logp"], mask), batch["advantages"], mask.double(), poisoned(batch["ref_logp"], mask),
        rollout_is_weights=weights, backend=backend, **options,
    )
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
    return loss.detach().cpu(), logp.grad.cpu(), {k: v.cpu() for k, v in stats.items()}


def peer_grad(fn, batch):
    logp = batch["logp"].clone().requires_grad_(True)
    loss = fn(logp)
    loss.backward()
    return loss.detach(), logp.grad


# ---- VERL ------------------------------------------------------------------------------------------------------------

VERL_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3",
                 "k1+": "k1+", "k2+": "k2+", "k3+": "k3+", "abs+": "abs+", "low_var_kl+": "k3+"}
VERL_AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
VERL_BATCH_INFO = {
    "local": {},
    "global": {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 13},
    "scale": {"loss_scale_factor": 64},
}


def verl_actor_config(verl, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, **batch_info):
    config = verl.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=clip_low,
                              clip_ratio_high=clip_high, clip_ratio_c=clip_ratio_c)
    config.global_batch_info.update(batch_info)  # as VERL's ppo_loss fills it
    return config


def verl_actor_loss(verl, batch, logp, loss_mode, agg, kl_name, kl_coef, config, weights=None):
    """What VERL's ``ppo_loss`` (verl/workers/utils/losses.py) adds up: the policy loss plus kl_coef * agg(kl)."""
    mask = batch["mask"]
    adv = batch["advantages"][:, None] * mask  # compute_grpo_outcome_advantage's layout
    pg, _ = verl.algos.get_policy_loss_fn(loss_mode)(
        old_log_prob=batch["old_logp"], log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg,
        config=config, rollout_is_weights=weights,
    )
    if not kl_coef:
        return pg
    kld = verl.algos.kl_penalty(logprob=logp, ref_logprob=batch["ref_logp"], kl_penalty=kl_name)
    return pg + kl_coef * verl.algos.agg_loss(kld, mask, agg, **config.global_batch_info)


def verl_options(agg, info, kl_name="low_var_kl", kl_coef=0.05, clip_ratio_c=3.0, clip_low=0.2, clip_high=0.28):
    return dict(
        loss_agg=agg, clip_low=clip_low, clip_high=clip_high, dual_clip=clip_ratio_c, kl_coef=kl_coef,
        kl_type=VERL_KL_NAMES[kl_name], num_tokens=info.get("batch_num_tokens"),
        num_seqs=info.get("global_batch_size"), dp_size=info.get("dp_size", 1), norm_length=info.get("loss_scale_factor"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", list(VERL_BATCH_INFO))
@pytest.mark.parametrize("agg", VERL_AGGS)
def test_verl_policy_loss_and_agg_loss(verl, agg, info, backend):
    batch, batch_info = make_batch(), VERL_BATCH_INFO[info]
    weights = None
    if info == "global":  # with rollout correction weights, as VERL's trainer makes them
        rollout_logp = batch["old_logp"] + 0.5 * torch.randn_like(batch["old_logp"])
        weights, _ = verl.corr.compute_rollout_correction_weights(
            batch["old_logp"] - rollout_logp, batch["mask"], rollout_is="token", rollout_is_threshold=2.0
        )
    config = verl_actor_config(verl, **batch_info)
    expected, expected_grad = peer_grad(
        lambda lp: verl_actor_loss(verl, batch, lp, "vanilla", agg, "low_var_kl", 0.05, config, weights), batch
    )
    loss, grad, stats = ours(batch, backend, weights, **verl_options(agg, batch_info))
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)
    assert stats["clip_frac"] > 0 and stats["clip_frac_lower"] > 0  # the clips were exercised


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_name", list(VERL_KL_NAMES))
def test_verl_kl_penalty(verl, kl_name, backend):
    batch = make_batch(spread=2.0)  # k3 past VERL's clamp of 10 at some tokens
    config = verl_actor_config(verl)
    expected, expected_grad = peer_grad(
        lambda lp: verl_actor_loss(verl, batch, lp, "vanilla", "token-mean", kl_name, 0.5, config), batch
    )
    loss, grad, stats = ours(batch, backend, **verl_options("token-mean", {}, kl_name, kl_coef=0.5))
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_verl_gspo(verl, agg, backend):
    batch = make_batch(spread=0.3)
    batch["old_logp"][0] -= 12.0  # a sequence ratio past VERL's clamp (log ratio <= 10)
    batch["old_logp"][2] += 12.0  # and one far below 1, which VERL leaves unclamped
    config = verl_actor_config(verl, clip_low=3e-4, clip_high=4e-4)
    expected, expected_grad = peer_grad(lambda lp: verl_actor_loss(verl, batch, lp, "gspo", agg, "k3", 0.0, config), batch)
    loss, grad, _ = ours(batch, backend, loss_agg=agg, clip_low=3e-4, clip_high=4e-4, ratio_level="sequence",
                         log_ratio_clamp=(-math.inf, 10.0))
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("icepop", [False, True])
def test_verl_rollout_correction_weights(verl, level, icepop):
    batch = make_batch(spread=0.4)
    mask = batch["mask"]
    rollout_logp = batch["old_logp"] + 0.4 * torch.randn_like(batch["old_logp"])
    log_ratio = torch.where(mask, batch["old_logp"] - rollout_logp, 0)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    raw = log_ratio.exp()[mask]
    upper, lower = raw.median().item(), raw.quantile(0.25).item() if icepop else None  # so that both bounds act
    expected, _ = verl.corr.compute_rollout_correction_weights(
        batch["old_logp"] - rollout_logp, mask, rollout_is=level,
        rollout_is_threshold=f"{lower}_{upper}" if icepop else upper,
    )
    weights = ops.rollout_correction_weights(poisoned(batch["old_logp"], mask), poisoned(rollout_logp, mask), mask,
                                             level, upper, lower)
    torch.testing.assert_close(weights, expected.to(weights.dtype), rtol=1e-12, atol=0)
    assert (weights[mask] == (0 if icepop else upper)).any() and (weights[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_entropy_from_the_fused_loss(verl, backend):
    """VERL's actor from logits: log-probs, ``entropy_from_logits``, and ``- entropy_coeff * agg(entropy)``."""
    batch = make_batch(B=4, T=5)
    mask, temperature, coeff, vocab = batch["mask"], 0.7, 0.01, 257
    logits = torch.randn(4, 5, vocab, dtype=torch.float64) * 2
    tokens = torch.randint(0, vocab, (4, 5))
    config = verl_actor_config(verl)

    def verl_loss(x):
        z = x / temperature
        logp = verl.F.logprobs_from_logits_naive(z, tokens)
        entropy = verl.F.entropy_from_logits(z)
        loss = verl_actor_loss(verl, batch, logp, "vanilla", "token-mean", "low_var_kl", 0.05, config)
        return loss - coeff * verl.algos.agg_loss(entropy, mask, "token-mean"), entropy

    x = logits.clone().requires_grad_(True)
    expected, expected_entropy = verl_loss(x)
    expected.backward()
    device = device_of(backend)
    on = {k: v.to(device) for k, v in batch.items()}
    y = logits.to(device, copy=True).requires_grad_(True)
    loss, _, entropy = ops.grpo_loss_from_logits(
        y, torch.where(mask, tokens, -100).to(device), poisoned(on["old_logp"], on["mask"]), on["advantages"],
        on["mask"], poisoned(on["ref_logp"], on["mask"]), temperature, return_entropy=True, inplace_backward=False,
        backend=backend, **verl_options("token-mean", {}),
    )
    entropy = entropy.cpu()
    total = loss.cpu() - coeff * verl.algos.agg_loss(entropy, mask, "token-mean")
    total.backward()
    torch.testing.assert_close(entropy, torch.where(mask, expected_entropy.detach(), 0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total.detach(), expected.detach(), **TOL)
    torch.testing.assert_close(y.grad.cpu(), x.grad, **TOL)


@pytest.mark.parametrize("scale", ["group", "none"])
def test_verl_grpo_outcome_advantage(verl, scale):
    G, n = 5, 4
    rewards = torch.randn(n * G, dtype=torch.float64)
    rewards[G:2 * G] = 0.7  # a group whose samples all scored the same
    mask = torch.ones(n * G, 3, dtype=torch.bool)
    index = [i // G for i in range(n * G)]
    expected, _ = verl.algos.compute_grpo_outcome_advantage(
        rewards[:, None] * torch.tensor([1.0, 0, 0], dtype=torch.float64), mask, index, epsilon=1e-6,
        norm_adv_by_std_in_grpo=scale == "group",
    )
    for backend in BACKENDS:
        adv = ops.group_advantages(rewards.to(device_of(backend)), G, eps=1e-6, scale=scale, backend=backend)
        torch.testing.assert_close(adv.cpu(), expected[:, 0], rtol=1e-12, atol=1e-9)


# ---- TRL and Liger ---------------------------------------------------------------------------------------------------

TRL_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]


class _Accelerator:
    """What ``GRPOTrainer._compute_loss`` asks of accelerate, for ``num_processes`` ranks holding the same batch."""

    sync_gradients = True

    def __init__(self, num_processes):
        self.num_processes = num_processes

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(batch, logp, loss_type, level, beta, delta, is_ratio, num_processes, accum, spg, max_len, num_items):
    """TRL's own ``GRPOTrainer._compute_loss`` on a trainer stand-in that hands it ``logp`` as the model's output."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logp.shape
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=spg),
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=True, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accum, accelerator=_Accelerator(num_processes),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": collections.defaultdict(list)},
        max_completion_length=max_len,
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.long), "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": batch["mask"].long(),
        "advantages": batch["advantages"], "old_per_token_logps": batch["old_logp"],
        "ref_per_token_logps": batch["ref_logp"], "num_items_in_batch": torch.tensor(float(num_items)),
        "importance_sampling_ratio": is_ratio,
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def trl_options(loss_type, level, beta, delta, num_processes, accum, spg, max_len, num_items, B, n_valid):
    """The documented mapping of a TRL configuration onto grpo_loss's options (see rlvrw.ops.grpo)."""
    options = dict(clip_low=0.2, clip_high=0.28, dual_clip=delta, kl_coef=beta, kl_type="k3", kl_clamp=math.inf,
                   log_ratio_clamp=math.inf, ratio_level=level, count_empty_seqs=True)
    if loss_type == "grpo":
        options.update(loss_agg="seq-mean-token-mean", num_seqs=B * accum)
    elif loss_type == "bnpo":
        options.update(loss_agg="token-mean", num_tokens=max(n_valid, 1) * accum)
    elif loss_type == "dr_grpo":
        options.update(loss_agg="seq-mean-token-sum-norm", num_seqs=B * accum, norm_length=max_len)
    elif loss_type == "dapo":
        options.update(loss_agg="token-mean", num_tokens=max(num_items, 1) * accum / spg, dp_size=num_processes)
    else:
        options.update(loss_agg="seq-mean-token-sum", num_seqs=B * accum)
    return options


TRL_CASES = [  # (loss_type, importance_sampling_level, delta, vLLM IS ratio per "token" / "sequence" / None, ranks)
    *[(t, "token", None, None, 1) for t in TRL_LOSS_TYPES],
    *[(t, "sequence", None, None, 1) for t in TRL_LOSS_TYPES],
    ("dapo", "token", 3.0, "token", 3),
    ("dapo", "sequence", None, "sequence", 4),
    ("grpo", "token", 2.5, "sequence", 2),
    ("bnpo", "token", None, "token", 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_trl_compute_loss(case, backend):
    pytest.importorskip("trl")
    loss_type, level, delta, is_level, ranks = case
    batch = make_batch(spread=0.7)
    B, T = batch["logp"].shape
    accum, spg, max_len, num_items, beta = 4, 2, 16, 130, 0.04
    is_ratio = None
    if is_level is not None:  # TRL's vLLM importance-sampling ratio, truncated (token_truncate / sequence_truncate)
        shape = (B, T) if is_level == "token" else (B, 1)
        is_ratio = torch.exp(0.3 * torch.randn(shape, dtype=torch.float64)).clamp(max=1.5) * (
            batch["mask"] if is_level == "token" else 1)
    args = (loss_type, level, beta, delta, is_ratio, ranks, accum, spg, max_len, num_items)
    expected, expected_grad = peer_grad(lambda lp: trl_loss(batch, lp, *args), batch)
    weights = None if is_ratio is None else (is_ratio if is_level == "token" else is_ratio[:, 0])
    options = trl_options(loss_type, level, beta, delta, ranks, accum, spg, max_len, num_items, B,
                          int(batch["mask"].sum()))
    loss, grad, _ = ours(batch, backend, weights, **options)
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("case", [("grpo", "token"), ("bnpo", "sequence"), ("dr_grpo", "token"), ("dapo", "token")])
def test_liger_fused_linear_grpo_loss(case):
    """Liger's fused linear GRPO loss = our ``linear_token_logprobs`` + ``grpo_loss``, gradients of hidden and weight.
    Liger rounds old/ref log-probs to float32, so those are float32 values here; its dapo normalizer is float32."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    loss_type, level = case
    B, T, H, V, temperature = 4, 6, 16, 97, 0.8
    batch = make_batch(B=B, T=T, spread=0.3)
    old, ref = batch["old_logp"].float().double(), batch["ref_logp"].float().double()
    mask, adv = batch["mask"], batch["advantages"]
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / 4
    tokens = torch.randint(0, V, (B, T))
    # per token; per sequence with the sequence-level ratio, where Liger and TRL differentiate the sequence ratio
    # itself and VERL (and we) each token's own log-prob: the same loss, and the same gradient unless the weights
    # vary along a sequence
    is_ratio = torch.exp(0.2 * torch.randn(B, T if level == "token" else 1, dtype=torch.float64)).clamp(max=1.3)
    is_ratio = is_ratio * mask
    liger = chunked.LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, epsilon_low=0.2, epsilon_high=0.28,
                                             loss_type=loss_type, max_completion_length=10, temperature=temperature,
                                             importance_sampling_level=level, delta=None)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = liger(h1, w1, tokens, mask.long(), adv, ref_per_token_logps=ref, old_per_token_logps=old,
                     vllm_is_ratio=is_ratio, num_items_in_batch=40)
    expected = expected[0] if isinstance(expected, tuple) else expected
    expected.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = ops.linear_token_logprobs(h2, w2, torch.where(mask, tokens, 0), temperature)
    options = trl_options(loss_type, level, 0.04, None, 1, 1, 1, 10, 40, B, int(mask.sum()))
    loss, _ = ops.grpo_loss(logp, poisoned(old, mask), adv, mask, poisoned(ref, mask),
                            rollout_is_weights=poisoned(is_ratio, mask), **options)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected.detach().double(), **LIGER_TOL)
    torch.testing.assert_close(h2.grad, h1.grad, **LIGER_TOL)
    torch.testing.assert_close(w2.grad, w1.grad, **LIGER_TOL)


# ---- OpenRLHF --------------------------------------------------------------------------------------------------------


def openrlhf_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps_low, clip_eps_high, dual_clip,
                         token_level_loss, policy_loss_type, coef=None, dp_size=1, batch_num_tokens=None,
                         global_batch_size=None):
    """OpenRLHF 0.11.2 ``PolicyLoss.forward``'s loss (openrlhf/models/loss.py, with ``aggregate_loss`` and
    ``masked_mean``), restated from its source; ``coef`` is its IS-correction coefficient (detached)."""
    if policy_loss_type == "gspo":
        token_level_loss = False
        log_ratio = log_probs - old_log_probs
        ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * action_mask
    else:
        ratio = (log_probs - old_log_probs).clamp(min=-20.0, max=20.0).exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        loss = -torch.where(advantages < 0, torch.max(clip1, dual_clip * advantages), clip1)
    if coef is not None:
        loss = coef * loss
    if token_level_loss:
        if batch_num_tokens is None:
            return (loss * action_mask).sum() / action_mask.sum()
        return (loss * action_mask).sum() / batch_num_tokens * dp_size
    counts = action_mask.sum(dim=-1)
    seq_loss = (loss * action_mask).sum(dim=-1) / (counts + 1e-8)
    seq_mask = (counts > 0).float()
    if global_batch_size is None:
        return (seq_loss * seq_mask).sum() / seq_mask.sum()
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


OPENRLHF_CASES = [  # (policy_loss_type, token_level_loss, dual_clip, global counts, IS coefficient)
    ("ppo", True, None, False, False), ("ppo", True, 3.0, True, True), ("ppo", False, None, False, True),
    ("ppo", False, 3.0, True, False), ("gspo", False, None, False, False), ("gspo", False, None, True, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPENRLHF_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_openrlhf_policy_loss(case, backend):
    loss_type, token_level, dual_clip, global_counts, with_coef = case
    batch = make_batch(spread=0.8 if loss_type == "ppo" else 0.2)
    mask, adv = batch["mask"].double(), batch["advantages"][:, None]
    coef = torch.exp(0.3 * torch.randn_like(mask)).clamp(0.5, 1.5) if with_coef else None  # its token TIS "clip"
    counts = dict(dp_size=2, batch_num_tokens=70, global_batch_size=11) if global_counts else {}
    expected, expected_grad = peer_grad(lambda lp: openrlhf_policy_loss(
        lp, batch["old_logp"], adv, mask, 0.2, 0.28, dual_clip, token_level, loss_type, coef, **counts), batch)
    options = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
                   loss_agg="token-mean" if token_level and loss_type == "ppo" else "seq-mean-token-mean",
                   num_tokens=counts.get("batch_num_tokens"), num_seqs=counts.get("global_batch_size"),
                   dp_size=counts.get("dp_size", 1))
    if loss_type == "gspo":
        options.update(ratio_level="sequence", log_ratio_clamp=math.inf)
    loss, grad, _ = ours(batch, backend, coef, **options)
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("case", OPENRLHF_CASES[:4], ids=lambda c: "-".join(str(v) for v in c))
def test_openrlhf_restatement_matches_the_package(case):
    loss_module = pytest.importorskip("openrlhf.models.loss", reason="OpenRLHF does not install on CPU")
    loss_type, token_level, dual_clip, global_counts, _ = case
    batch = make_batch()
    mask, adv = batch["mask"].double(), batch["advantages"][:, None]
    counts = dict(dp_size=2, batch_num_tokens=70, global_batch_size=11) if global_counts else {}
    module = loss_module.PolicyLoss(0.2, 0.28, dual_clip, token_level, loss_type)
    expected = module(batch["logp"], batch["old_logp"], adv, mask, **counts)[0]
    mine = openrlhf_policy_loss(batch["logp"], batch["old_logp"], adv, mask, 0.2, 0.28, dual_clip, token_level,
                                loss_type, **counts)
    torch.testing.assert_close(mine, expected, rtol=1e-12, atol=0)
