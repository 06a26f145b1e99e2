"""The RL step of the video world model, and its rollout alone: rlvrw beside the plain PyTorch way.

- ``rl_rollout``: G=16 responses per prompt.
  ``rlvrw``: ``GroupSampler``: one prefill per prompt shared by its group, legal-range Gumbel-max sampling with
  no host sync, the decode step replayed from a CUDA graph (GPU).
  ``eager``: the way a generic ``generate`` loop does it: every prompt prefilled G times, then per position a
  full-vocabulary softmax masked to the legal ids and ``torch.multinomial``, the position handed to the model
  as a fresh host tensor, no graph.
- ``rl_step``: one whole GRPO step (rollout, decode, reward, advantages, reference and policy log-probs, loss,
  backward, clipping, AdamW).
  ``rlvrw``: ``GRPOTrainer.train_step``: the sampler above on a bf16 copy of the policy, ``decode_fast``,
  ``ops.l1_lpips_reward`` (ground-truth features once per group), ``ops.linear_token_logprobs`` on the frame rows
  of the output layer, ``ops.grpo_loss`` (old log-probs from the training forward).
  ``eager``: VERL's way in plain PyTorch: the eager rollout, the plain fp32 decoder, the reference code's reward
  (ground truth repeated for every sample), old log-probs recomputed by a separate no-grad forward, full
  (B, T, V) logits, ``peers.verl_grpo_step_loss``, AdamW.

On a GPU: the paper's 120M model and layout (1333 + 321 tokens), the paper's tokenizer (256x320 frames), LPIPS-VGG,
4 prompts x G=16, micro-batches of 16, bf16 autocast. On CPU (unless ``RLVRW_BENCH_FULL=1``): the small model,
64-token frames (32x32 pixels), 2 prompts x G=4. Random weights throughout: the time does not depend on their values.
``extra_info.tokens_per_s``: response tokens per second (rollout rows x response length / median time).
"""

from __future__ import annotations

import pytest
import torch

import rlvrw.reference as reference
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models import LPIPS, FrameTokenizer, WorldModelConfig, WorldModelTransformer
from rlvrw.reference import peers
from rlvrw.reference.reward import l1_lpips_reward as reference_reward
from rlvrw.train import distributed
from rlvrw.train import trainer as T
from rlvrw.train.rollout import GroupSampler

IMPLS = ("rlvrw", "eager")
FULL = dict(layout=SequenceLayout.single_step(), grid=(16, 20), model=WorldModelConfig(), tokenizer={}, prompts=4,
            group=16, label="120M single-step")
CPU = dict(layout=SequenceLayout.single_step(frame_tokens=64, context_frames=2), grid=(8, 8),
           model=WorldModelConfig.small(), tokenizer=dict(channels=(32, 64, 64), num_groups=16, latent_channels=16),
           prompts=2, group=4, label="small single-step (CPU-scaled)")
ROUNDS = 3  # a step takes seconds; three rounds after the warm-ups


def _problem(env) -> dict:
    problem = dict(FULL if env.full else CPU)
    layout = problem["layout"]
    gen = torch.Generator().manual_seed(0)
    batch = problem["prompts"]
    frames = torch.randint(0, layout.codebook_size, (batch, layout.num_frames, layout.frame_tokens), generator=gen)
    actions = torch.randint(0, layout.action_bins, (batch, layout.num_actions, layout.action_dims), generator=gen)
    problem["sequences"] = layout.build(frames, actions).to(env.device)
    problem["shape"] = (f"{problem['label']}: {batch} prompts x G={problem['group']}, "
                        f"{layout.prompt_len}+{layout.response_len} tokens")
    return problem


def _policy(env, problem) -> WorldModelTransformer:
    torch.manual_seed(0)
    return WorldModelTransformer(problem["model"]).to(env.device)


def eager_rollout(model, layout, prompts, known, group, temperature=1.0):
    """Whole sequences (B*G, seq_len) and sampling log-probs (B*G, R), the plain way (see the module doc)."""
    device = prompts.device
    rows, known = prompts.repeat_interleave(group, 0), known.repeat_interleave(group, 0)
    model.setup_cache(rows.shape[0], layout.seq_len - 1)
    logits = model.prefill(rows)
    tables, vocab = layout.response_tables(device), torch.arange(logits.shape[-1], device=device)
    tokens, logps = [], []
    for j in range(layout.response_len):
        legal = (vocab >= tables.low[j]) & (vocab < tables.high[j])
        logp = (logits.float() / temperature).masked_fill(~legal, float("-inf")).log_softmax(-1)
        drawn = torch.multinomial(logp.exp(), 1)[:, 0]
        token = torch.where(tables.loss_mask[j], drawn, known[:, j])
        tokens.append(token)
        logps.append(torch.where(tables.loss_mask[j], logp.gather(1, token[:, None])[:, 0], 0.0))
        if j + 1 < layout.response_len:
            logits = model.decode_step(token, torch.tensor(layout.prompt_len + j, device=device))
    model.free_cache()
    return torch.cat([rows, torch.stack(tokens, 1)], 1), torch.stack(logps, 1)


def _config(problem) -> T.RLConfig:
    return T.RLConfig(group_size=problem["group"], prompts_per_step=problem["prompts"],
                      rollout_prompts=problem["prompts"], micro_batch_size=16, token_grid=problem["grid"],
                      lpips_weights="random")


@pytest.mark.parametrize("impl", IMPLS)
def test_rl_rollout(bench, bench_env, benchmark, impl):
    env = bench_env
    problem = _problem(env)
    layout, group = problem["layout"], problem["group"]
    prompts, known = layout.split(problem["sequences"])

    def make_state():
        model = _policy(env, problem).to(torch.bfloat16 if env.is_cuda else torch.float32)
        state = {"model": model}
        if impl == "rlvrw":
            state["sampler"] = GroupSampler(model, layout, group, max_prompts=problem["prompts"])
        return state

    def step(state):
        with torch.no_grad(), T.value_checks_off_on_gpu(env.device):
            if impl == "rlvrw":
                state["sampler"].sample(prompts, known, seed=0)
            else:
                eager_rollout(state["model"], layout, prompts, known, group)

    bench.run(op="rl_rollout", impl=impl, shape=problem["shape"], make_state=make_state, step=step, rounds=ROUNDS,
              extra={"passes": "sample", "group_size": group})
    _tokens_per_second(benchmark, problem)


@pytest.mark.parametrize("impl", IMPLS)
def test_rl_step(bench, bench_env, benchmark, impl):
    env = bench_env
    problem = _problem(env)
    layout, group, sequences = problem["layout"], problem["group"], problem["sequences"]
    config = _config(problem)
    context = distributed.DistributedContext(0, 1, 0, env.device)

    def make_state():
        policy = _policy(env, problem)
        torch.manual_seed(0)
        tokenizer = FrameTokenizer(**problem["tokenizer"]).to(env.device).eval().requires_grad_(False)
        lpips = LPIPS("vgg", random_weights=True).to(env.device)
        if impl == "rlvrw":
            return {"trainer": T.GRPOTrainer(config, policy, layout, tokenizer, lpips, context), "step": 0}
        frozen = WorldModelTransformer(problem["model"]).to(env.device).requires_grad_(False)
        frozen.load_state_dict(policy.state_dict())
        rollout_model = WorldModelTransformer(problem["model"]).to(env.device, T.autocast_dtype("auto", env.device)
                                                                   or torch.float32)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        return {"policy": policy, "reference": frozen.to(torch.bfloat16), "rollout_model": rollout_model,
                "tokenizer": tokenizer, "lpips": lpips, "optimizer": optimizer}

    def rlvrw_step(state):
        state["trainer"].train_step(sequences, state["step"])
        state["step"] += 1

    def eager_step(state):
        eager_grpo_step(state, layout, sequences, config, problem["grid"], env.device)

    bench.run(op="rl_step", impl=impl, shape=problem["shape"], make_state=make_state,
              step=rlvrw_step if impl == "rlvrw" else eager_step, rounds=ROUNDS,
              extra={"passes": "rollout+decode+reward+fwd+bwd+adamw", "group_size": group,
                     "config": {k: v for k, v in config.to_dict().items() if k in ("clip_low", "dual_clip", "kl_coef",
                                                                                 "micro_batch_size", "temperature")}})
    _tokens_per_second(benchmark, problem)


def eager_grpo_step(state, layout, sequences, config, grid, device):
    """VERL's GRPO step written plainly (see the module doc)."""
    policy, group = state["policy"], config.group_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad():
        state["rollout_model"].load_state_dict(policy.state_dict())
        prompts, known = layout.split(sequences)
        ids, _ = eager_rollout(state["rollout_model"], layout, prompts, known, group, config.temperature)
        decode = state["tokenizer"].decode
        predicted = decode(layout.response_frames(ids[:, layout.prompt_len :])[:, 0].unflatten(1, grid))
        truth = decode(layout.response_frames(sequences[:, layout.prompt_len :])[:, 0].unflatten(1, grid))
        rewards = reference_reward(predicted, truth, group, state["lpips"])
        advantages = reference.group_advantages(rewards, group)
    tokens = ids[:, layout.prompt_len :]
    mask = layout.response_tables(device).loss_mask.expand_as(tokens).float()

    def response_logits(model, rows):
        return model(ids[rows, :-1])[:, layout.prompt_len - 1 :]

    micro = [slice(s, s + config.micro_batch_size) for s in range(0, ids.shape[0], config.micro_batch_size)]
    with torch.no_grad(), autocast:  # VERL recomputes the old log-probs, then the reference's, before the update
        old = [peers.verl_logprobs_from_logits(response_logits(policy, rows).float(), tokens[rows]) for rows in micro]
        ref = [peers.verl_logprobs_from_logits(response_logits(state["reference"], rows).float(), tokens[rows])
               for rows in micro]
    for rows, old_logp, ref_logp in zip(micro, old, ref):
        with autocast:
            logits = response_logits(policy, rows)
        loss = peers.verl_grpo_step_loss(logits.float(), tokens[rows], old_logp, ref_logp,
                                         advantages[rows, None].expand_as(old_logp),
                                         mask[rows], clip_ratio_c=config.dual_clip, kl_coef=config.kl_coef)
        (loss * (rows.stop - rows.start) / ids.shape[0]).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
    state["optimizer"].step()
    state["optimizer"].zero_grad(set_to_none=True)


def _tokens_per_second(benchmark, problem) -> None:
    if benchmark.stats is not None:
        rows = problem["prompts"] * problem["group"]
        benchmark.extra_info["tokens_per_s"] = rows * problem["layout"].response_len / benchmark.stats.stats.median
