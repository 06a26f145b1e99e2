"""GRPO post-training of the video world model (RLVR-World), and the ``rlvrw rl`` command.

One step (``GRPOTrainer.train_step``), with nothing read back to the host between the start of the rollout and the
optimizer step:

    clips: prompts + true responses ──► GroupSampler: G responses per prompt (one prefill per prompt, CUDA graph)
      ──► FrameRenderer: predicted frames (FSQ table gather + fused decoder); the true frames likewise
      ──► ops.frame_reward against the true frames (``reward``: -(L1 + LPIPS) by default, or any metric or weighted
          sum; LPIPS features of the truth computed once per group), each term returned for the logs
      ──► ops.group_advantages: (r - mean_g) / (std_g + eps), unbiased std
      ──► rlvrw.train.grpo.grpo_update, per micro-batch: reference log-probs (frozen copy, bf16), policy log-probs
          and entropies (rlvrw.train.scoring), ops.grpo_loss with the global token count ──► backward;
          then gradient clipping ──► AdamW

Defaults are RLVR-World's: G=16, temperature 1, no top-k, reward -(L1 + LPIPS-VGG), clip 0.2, dual clip 3, k3 KL with
coefficient 1e-3 against the starting model, token-mean, AdamW lr 5e-5 wd 0.01, gradient clipping at 1.

Log-probs. The sampler draws each frame token from softmax(logits / temperature) over the legal ids of its position
(the frame codebook). The trainer scores tokens under that same distribution: ``SampledTokenLogprobs`` runs the output
layer on the rows of the legal ids only. ``old_logp="recompute"`` (the default, VERL's choice) takes the old log-probs
from the trainer's own forward: with one optimizer step per rollout, as here, recomputing them before the update
gives exactly the training forward's values, so they are that forward's, detached, at no extra cost; the ratio is
then 1 and never clipped. ``old_logp="rollout"`` uses the sampler's log-probs, which differ by the decode path's
rounding (bf16 on a GPU): the ratio then corrects for that mismatch, and the clipping bounds it. Either way the
mean absolute difference between the two is logged as ``logp_gap``.

Frames. The token cache holds ids, not pixels, so the reward's true frame is the tokenizer's decoding of the true ids:
the best frame that the world model's tokens can produce. Predicted and true frames go through the same decoder.

Data parallelism (torchrun, DDP): every rank holds the whole model, rolls out and scores its own prompts (a group
never spans ranks), and draws with the noise of its global rows, so any split of a global batch over ranks samples
the same responses; the token normalizer is the global count and gradients are averaged. (FSDP2 is not offered: the
sampler needs the whole model on every rank at every decode step.)

Runs: ``OUT/`` receives ``config.json``, ``metrics.jsonl`` (and ``tensorboard/``), ``checkpoints/step_*`` (model,
optimizer, random states, step and data position; written atomically) and ``model/`` at the end. A run continues from
the newest checkpoint; the clips and the sampling noise of a step are functions of (seed, step), so on CPU a resumed
run is bit-identical to an uninterrupted one.

    rlvrw rl --data tokens.npz --tokenizer tokenizer.safetensors --init-from runs/pretrain/model --out runs/rl \\
        --token-grid 16 20
    torchrun --nproc-per-node 8 -m rlvrw.train.trainer --data tokens.npz ... --prompts-per-step 128
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

import rlvrw.ops as ops
from rlvrw import checks, usage
from rlvrw.data.clips import ClipSampler, layout_for_cache
from rlvrw.data.sequences import SequenceLayout
from rlvrw.data.token_cache import load_token_cache
from rlvrw.guard import ON_NONFINITE, ON_NONFINITE_HELP, NonFiniteGuard
from rlvrw.models.transformer import ATTENTION_BACKENDS, WorldModelTransformer
from rlvrw.reference.grpo import ADVANTAGE_SCALES, KL_TYPES, LOSS_AGGS
from rlvrw.train import distributed
from rlvrw.train.build import (
    MODEL_SIZES,
    PRECISIONS,
    autocast_dtype,
    build_world_model,
    check_training_settings,
    make_optimizer,
    make_scheduler,
    value_checks_off_on_gpu,
)
from rlvrw.train.checkpoints import RESUME_HELP
from rlvrw.train.config import RunConfig, check_model_dir, check_token_cache, config_command, option, print_summary
from rlvrw.train.grpo import ScoredRows, grpo_update
from rlvrw.train.logging import TENSORBOARD_CHOICES
from rlvrw.train.render import FrameRenderer, mean_abs_error, repeated_frames
from rlvrw.train.rollout import GroupSampler, Rollout
from rlvrw.train.run_loop import LogWindow, Stage, in_process_group, run_stage
from rlvrw.train.scoring import SampledTokenLogprobs, sampled_token_range  # noqa: F401
from rlvrw.usage import UsageError


OLD_LOGP_SOURCES = ("recompute", "rollout")
REFERENCE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LPIPS_NETS = ("vgg", "alex", "squeeze")
RANDOM_LPIPS = "random"
PHASES = ("rollout", "decode", "reward", "update")


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RLConfig(RunConfig):
    """Everything ``rl`` needs; every field is also a command-line flag (``--group-size 16``)."""

    data: str = option("", "token cache: an .npz file or a directory of them (format: rlvrw.data.token_cache)")
    tokenizer: str = option("", "the tokenizer checkpoint (from `rlvrw tokenizer`) that decodes frames")
    out_dir: str = option("runs/rl", "run directory: checkpoints, logs, the final model")
    init_from: str = option("", "the pre-trained world model (a Hugging Face LlamaForCausalLM directory, e.g. "
                                 "`rlvrw pretrain`'s OUT/model); empty: a fresh model of --model's size")
    model: str = option("small", "without --init-from: model size 'small' or 'base'", choices=MODEL_SIZES)
    model_overrides: dict = option({}, "without --init-from: WorldModelConfig fields, as JSON", type=json.loads)
    attention_backend: str = option("auto", "attention kernels", choices=ATTENTION_BACKENDS)
    token_grid: tuple[int, int] | None = option(None, "single-step: the h x w grid of a frame's tokens (default: "
                                                       "square)", nargs=2, type=int, metavar=("H", "W"))
    context_frames: int = option(4, "frames (with their actions) in the prompt")
    frame_skip: int = option(1, "steps between the frames of a clip")
    codebook_size: int = option(4375, "frame codebook size, when the cache does not store it")
    action_bins: int = option(256, "bins per action dimension")
    steps: int = option(150, "RL steps (one rollout and one optimizer step each)")
    prompts_per_step: int = option(128, "prompts per step over all processes")
    group_size: int = option(16, "responses sampled per prompt (G)")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(0, "sample from the k most likely frame tokens only (0: all)")
    rollout_prompts: int = option(16, "prompts per rollout pass, per process (the KV cache holds this x G rows)")
    cuda_graph: bool = option(True, "on a GPU, replay the decode step from a CUDA graph")
    micro_batch_size: int = option(16, "sequences per training forward pass, per process")
    lr: float = option(5e-5, "AdamW learning rate")
    warmup_steps: int = option(0, "linear warmup steps")
    min_lr_ratio: float = option(1.0, "after warmup, cosine decay to this fraction of lr (1: constant)")
    weight_decay: float = option(0.01, "AdamW weight decay (not on norm weights)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", nargs=2, type=float, metavar=("B1", "B2"))
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    clip_low: float = option(0.2, "PPO ratio clip below 1")
    clip_high: float = option(0.2, "PPO ratio clip above 1")
    dual_clip: float = option(3.0, "dual clip: cap of a negative advantage's loss, as a ratio (0: off)")
    kl_coef: float = option(1e-3, "KL coefficient against the starting model (0: no KL and no reference model)")
    kl_type: str = option("k3", "KL estimator", choices=KL_TYPES)
    loss_agg: str = option("token-mean", "loss aggregation", choices=LOSS_AGGS)
    adv_eps: float = option(1e-6, "advantage = (r - mean) / (std + adv_eps)")
    adv_scale: str = option("group", "advantage scale: group std, batch std or none", choices=ADVANTAGE_SCALES)
    old_logp: str = option("recompute", "old log-probs: the trainer's forward (recompute) or the sampler's",
                            choices=OLD_LOGP_SOURCES)
    ref_dtype: str = option("bf16", "dtype of the frozen reference model", choices=tuple(REFERENCE_DTYPES))
    ref_offload: bool = option(False, "on a GPU, keep the reference model in host memory between uses")
    reward: str = option("l1+lpips", "the reward (ops.frame_reward's metric): mae, mse, psnr, ssim, lpips, l1+lpips, "
                                      "or a weighted sum such as 'mae+0.5*lpips'")
    l1_weight: float = option(1.0, "reward l1+lpips = -(l1_weight * L1 + lpips_weight * LPIPS)")
    lpips_weight: float = option(1.0, "see l1_weight")
    lpips_net: str = option("vgg", "LPIPS backbone", choices=LPIPS_NETS)
    lpips_weights: str = option("", "LPIPS weights file (default: rlvrw's cache; 'random': untrained, tests only)")
    precision: str = option("auto", "auto (bf16 on a GPU, fp32 on CPU), bf16 or fp32: training autocast and the "
                                     "sampler's copy of the model", choices=PRECISIONS)
    device: str = option("auto", "auto, cpu or cuda")
    seed: int = option(0, "seeds the initialization, the clips and the sampling noise")
    log_every: int = option(1, "log every this many steps (logging reads the metrics back: a host sync)")
    save_every: int = option(50, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept (older ones are deleted)")
    resume: bool | None = option(None, RESUME_HELP)
    on_nonfinite: str = option("stop", ON_NONFINITE_HELP, choices=ON_NONFINITE)
    stop_at_step: int = option(0, "end this run after this step, schedule unchanged (0: run all steps)")
    tensorboard: str = option("auto", "TensorBoard logs: auto (when installed), on or off",
                               choices=TENSORBOARD_CHOICES)
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        super().__post_init__()
        if self.token_grid is not None:
            self.token_grid = tuple(self.token_grid)
            if len(self.token_grid) != 2:
                raise ValueError(f"token_grid must be two positive ints (h, w), got {self.token_grid!r}")
            for value in self.token_grid:
                checks.integer("token_grid", value)
        self.betas = tuple(self.betas)
        for name in ("context_frames", "frame_skip", "codebook_size", "action_bins", "steps", "prompts_per_step",
                     "group_size", "rollout_prompts", "micro_batch_size", "log_every", "save_every",
                     "keep_checkpoints"):
            checks.integer(name, getattr(self, name))
        for name in ("top_k", "warmup_steps", "seed", "stop_at_step"):
            checks.integer(name, getattr(self, name), low=0)
        for name in ("weight_decay", "grad_clip", "dual_clip", "kl_coef", "adv_eps", "l1_weight", "lpips_weight"):
            checks.number(name, getattr(self, name), low=0)
        for name in ("lr", "temperature"):
            checks.positive(name, getattr(self, name))
        check_training_settings(self)
        if not any(self.reward_weights().values()):
            raise ValueError(f"every weight of the reward {self.reward!r} is 0 (l1_weight, lpips_weight): the reward "
                             "would be constant")
        ops.GRPOOptions(**self.loss_options())  # the loss's own checks (clip ranges), now rather than at step 1

    def reward_weights(self) -> dict[str, float]:
        """``ops.frame_reward``'s metric weights: ``l1_weight`` and ``lpips_weight`` for l1+lpips, else the
        reward's own (ValueError naming the choices for an unknown metric)."""
        from rlvrw.ops.reward import reward_weights

        if self.reward == "l1+lpips":
            return {"mae": self.l1_weight, "lpips": self.lpips_weight}
        return reward_weights(self.reward)

    def loss_options(self) -> dict:
        """The keyword options of ``ops.grpo_loss`` (the global token count is added per step)."""
        return dict(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip or None,
                    kl_coef=self.kl_coef, kl_type=self.kl_type, loss_agg=self.loss_agg)

    def check_inputs(self) -> None:
        """The files a run reads must exist, and ``out_dir`` be no file (the trainer alone, as tests build it, needs
        none of them)."""
        check_token_cache("data", self.data)
        usage.existing_file("tokenizer", self.tokenizer, "a tokenizer checkpoint from `rlvrw tokenizer`")
        if self.init_from:
            check_model_dir("init_from", self.init_from)
        usage.output_dir("out_dir", self.out_dir)



# ----------------------------------------------------------------------------------------------------------------------
# Scoring sampled tokens
# ----------------------------------------------------------------------------------------------------------------------


class ReferencePolicy:
    """The frozen starting policy of the KL term: a copy of ``policy`` in ``dtype``. With ``offload`` on a GPU its
    weights stay in pinned host memory and are copied to the device (non-blocking) once per step, for that step."""

    def __init__(self, policy: WorldModelTransformer, layout: SequenceLayout, temperature: float,
                 dtype: torch.dtype, device: torch.device, offload: bool = False):
        frozen = copy.deepcopy(policy).to(dtype).requires_grad_(False).eval()
        self.device = device
        self.offload = offload and device.type == "cuda"
        self.scorer = SampledTokenLogprobs(frozen, layout, temperature).to("cpu" if self.offload else device)
        self.host_tensors = {}
        if self.offload:
            for name, tensor in (*self.scorer.named_parameters(), *self.scorer.named_buffers()):
                tensor.data = tensor.data.pin_memory()
                self.host_tensors[name] = tensor

    @contextlib.contextmanager
    def loaded(self):
        """Yields ``logprobs(ids) -> (n, L)``, the reference's log-probs of the sampled tokens (no gradient)."""
        if not self.offload:
            yield torch.no_grad()(lambda ids: self.scorer(ids)[0])
            return
        # leaving the context drops the device copies; the allocator reuses their memory in stream order, no sync
        on_device = {name: t.to(self.device, non_blocking=True) for name, t in self.host_tensors.items()}
        yield torch.no_grad()(lambda ids: functional_call(self.scorer, on_device, (ids,))[0])


def sampling_seed(seed: int, step: int) -> int:
    """The sampler's noise seed of a step: a function of (seed, step) alone, independent of the clip stream."""
    return int(np.random.SeedSequence([seed, step], spawn_key=(1,)).generate_state(1)[0])


class PhaseTimer:
    """Durations of the phases of a step without a host sync: CUDA events on a GPU, read once the step is over;
    ``perf_counter`` on CPU, where every op has finished when it returns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = [("start", self._now())]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase: str) -> None:
        """The phase ``phase`` ends now (it began at the previous mark)."""
        self.marks.append((phase, self._now()))

    def seconds(self) -> dict[str, float]:
        """{phase: seconds}; on a GPU this waits for the last mark."""
        if self.cuda:
            self.marks[-1][1].synchronize()
            return {name: start.elapsed_time(end) / 1e3 for (_, start), (name, end) in zip(self.marks, self.marks[1:])}
        return {name: end - start for (_, start), (name, end) in zip(self.marks, self.marks[1:])}


# ----------------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------------

# The per-step sums that ``train_step`` returns, in the order ``reduce_metrics`` all-reduces them: sums over samples,
# then loss terms already divided by the global token count (their sum over ranks is the global mean).
# Each term of the reward, ``reward_<metric>``, is there when the reward has it.
REWARD_TERMS = ("reward_mae", "reward_mse", "reward_psnr", "reward_ssim", "reward_lpips")
SAMPLE_SUMS = ("reward", "reward_sq", "reward_l1", *REWARD_TERMS, "repetition", "samples")
TOKEN_MEANS = ("loss", "pg_loss", "kl", "clip_frac", "clip_frac_lower", "approx_kl", "entropy", "logp_gap")
SUMMED = SAMPLE_SUMS + TOKEN_MEANS


class GRPOTrainer:
    """GRPO steps of a world model (see the module doc). Holds the policy, its data-parallel wrapper, the optimizer
    and learning-rate schedule, the sampler (on a bf16 copy of the policy when training autocasts to bf16, else on
    the policy itself), the frozen reference (when ``kl_coef`` > 0) and the reward's decoder and LPIPS network
    (None when the reward has no LPIPS term).

    ``policy``, ``tokenizer`` and ``lpips`` must be on ``context.device``. Build the trainer before loading a
    checkpoint into the policy: the reference is copied from the policy here.
    """

    def __init__(self, config: RLConfig, policy: WorldModelTransformer, layout: SequenceLayout,
                 tokenizer: nn.Module, lpips: nn.Module, context: distributed.DistributedContext):
        self.config, self.policy, self.layout, self.lpips, self.context = config, policy, layout, lpips, context
        self.reward_weights = config.reward_weights()
        device = context.device
        self.dtype = autocast_dtype(config.precision, device)
        self.reference = None
        if config.kl_coef:
            self.reference = ReferencePolicy(policy, layout, config.temperature, REFERENCE_DTYPES[config.ref_dtype],
                                             device, config.ref_offload)
        self.scorer = SampledTokenLogprobs(policy, layout, config.temperature).to(device)
        self.wrapped = distributed.wrap_model(self.scorer, context, "ddp")
        self.optimizer = make_optimizer(policy, config, fused=device.type == "cuda")
        self.scheduler = make_scheduler(self.optimizer, config)
        rollout_dtype = self.dtype or policy.lm_head.weight.dtype
        self.rollout_model = policy
        if rollout_dtype != policy.lm_head.weight.dtype:
            self.rollout_model = copy.deepcopy(policy).to(rollout_dtype).requires_grad_(False).eval()
        self.sampler = GroupSampler(self.rollout_model, layout, config.group_size, max_prompts=config.rollout_prompts,
                                    temperature=config.temperature, top_k=config.top_k, cuda_graph=config.cuda_graph)
        decode_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.renderer = FrameRenderer(tokenizer, layout, config.token_grid, decode_dtype)
        self.response_positions = self.scorer.response_positions.to(device)
        self.loss_options = config.loss_options()
        self.guard = NonFiniteGuard(config.on_nonfinite, "rl")

    def _sync_rollout_model(self) -> None:
        """Copy the policy's weights into the sampler's copy (in place: a captured CUDA graph reads these tensors)."""
        if self.rollout_model is self.policy:
            return
        with torch.no_grad():
            for target, source in zip(self.rollout_model.parameters(), self.policy.parameters()):
                target.copy_(source)

    def train_step(self, sequences: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], PhaseTimer]:
        """One GRPO step on this rank's clips: ``sequences`` (B, seq_len), the true whole sequences, on the device.

        Returns ({name: 0-d device tensor} of this rank's sums, named in ``SUMMED``, plus ``grad_norm``; a
        ``PhaseTimer``). Nothing is read back to the host: pass the sums to ``reduce_metrics`` to log them.
        """
        config, layout, group = self.config, self.layout, self.config.group_size
        with value_checks_off_on_gpu(self.context.device):
            timer = PhaseTimer(self.context.device)
            self._sync_rollout_model()
            prompts, known = layout.split(sequences)
            first_row = self.context.rank * sequences.shape[0] * group
            rollout = self.sampler.sample(prompts, known, sampling_seed(config.seed, step), first_row)
            timer.mark("rollout")
            predicted, truth = self.renderer(rollout.ids), self.renderer(sequences)
            timer.mark("decode")
            with torch.no_grad():
                rewards, terms = ops.frame_reward(predicted, truth, group, self.reward_weights, self.lpips,
                                                  frame_reduction="mean", return_terms=True)
                l1 = mean_abs_error(predicted, truth, group)
                advantages = ops.group_advantages(rewards, group, config.adv_eps, config.adv_scale)
            timer.mark("reward")
            sums = self.update(rollout, advantages, step + 1)
            timer.mark("update")
        # float64: the std comes from E[r^2] - E[r]^2 over every rank, which cancels most of fp32's digits; the terms
        # are summed alike, so a one-term reward logs the same mean as its term
        sums.update({f"reward_{name}": value.double().sum() for name, value in terms.items()})
        sums.update(reward=rewards.double().sum(), reward_sq=rewards.double().square().sum(),
                    reward_l1=l1.double().sum(),
                    repetition=repeated_frames(layout, rollout.ids).sum(),
                    samples=torch.full((), float(rewards.numel()), device=rewards.device))
        return sums, timer

    def update(self, rollout: Rollout, advantages: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        """The policy-gradient half of a step: ``rlvrw.train.grpo.grpo_update`` on this rank's rollouts, the
        policy scored under autocast, normalized by the global token (or sequence) count, AdamW through
        ``self.guard`` (``step`` names the step in its report). advantages (n,). Returns the loss terms' sums over
        micro-batches (each already divided by the global token count, so the sum over ranks is the global mean),
        ``entropy``, ``logp_gap`` and ``grad_norm``."""
        config, device = self.config, self.context.device
        ids, world = rollout.ids, self.context.world_size
        rows, length = ids.shape[0], self.scorer.num_tokens
        # the whole batch's counts (every rank holds as many rollouts), so that micro-batches and ranks add up to it
        global_tokens = torch.full((), float(rows * length * world), device=device)
        global_sequences = torch.full((), float(rows * world), device=device)
        sampled_logp = rollout.logp.index_select(1, self.response_positions)
        mask = torch.ones(rows, length, dtype=torch.bool, device=device)
        extra = {name: torch.zeros((), device=device) for name in ("entropy", "logp_gap")}
        autocast = torch.autocast(device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with self.reference.loaded() if self.reference else contextlib.nullcontext() as reference_logprobs:

            def score(part: slice) -> ScoredRows:
                ref_logp = reference_logprobs(ids[part]) if reference_logprobs else None
                with autocast:
                    logp, entropy = self.wrapped(ids[part])
                extra["entropy"] += entropy.detach().sum() / global_tokens
                extra["logp_gap"] += (logp.detach() - sampled_logp[part]).abs().sum() / global_tokens
                old_logp = None if config.old_logp == "recompute" else sampled_logp[part]
                return ScoredRows(logp, old_logp, mask[part], ref_logp)

            sums = grpo_update(score, rows, config.micro_batch_size, advantages, self.optimizer,
                               self.policy.parameters(), num_tokens=global_tokens, num_seqs=global_sequences,
                               grad_clip=config.grad_clip, guard=self.guard, step=step, scheduler=self.scheduler,
                               world_size=world, gradient_sync=functools.partial(distributed.gradient_sync,
                                                                                 self.wrapped),
                               **self.loss_options)
        return {**sums, **extra}


def reduce_metrics(sums: dict[str, torch.Tensor], timer: PhaseTimer | None = None) -> dict[str, float]:
    """The logged metrics of a step from every rank's ``train_step`` sums (a collective under torch.distributed,
    and a host sync): reward mean and std (over all samples), its L1 and LPIPS parts, repetition rate, the loss
    terms, entropy, ``logp_gap`` (mean |trainer - sampler| log-prob), the gradient norm and, with ``timer``, the
    seconds of each phase (rank 0's)."""
    names = [name for name in SUMMED if name in sums]  # every rank has the same reward terms
    totals = distributed.all_reduce_sum(torch.stack([sums[name].double() for name in names])).tolist()
    total = dict(zip(names, totals))
    samples = total.pop("samples")
    mean = total["reward"] / samples
    metrics = {
        "reward_mean": mean,
        "reward_std": max(total["reward_sq"] / samples - mean * mean, 0.0) ** 0.5,
        "reward_l1": total["reward_l1"] / samples,
        **{name: total[name] / samples for name in REWARD_TERMS if name in total},
        "repetition_rate": total["repetition"] / samples,
    }
    metrics.update({name: total[name] for name in TOKEN_MEANS})
    metrics["grad_norm"] = float(sums["grad_norm"])
    if timer is not None:
        metrics.update({f"time_{name}_s": seconds for name, seconds in timer.seconds().items()})
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def load_lpips(config: RLConfig, device: torch.device) -> nn.Module:
    from rlvrw.models.lpips import LPIPS

    if config.lpips_weights == RANDOM_LPIPS:
        return LPIPS(config.lpips_net, random_weights=True).to(device)
    return LPIPS(config.lpips_net, weights=config.lpips_weights or None).to(device)


def rl(config: RLConfig) -> dict:
    """Post-train (or continue post-training) the world model as ``config`` says; see the module doc. Under torchrun
    every process calls this. Returns {"step", "reward_mean", "checkpoint", "model_dir"}."""
    return in_process_group(config, _train)


def _train(config: RLConfig, context: distributed.DistributedContext) -> dict:
    from rlvrw.models.tokenizer_files import load_tokenizer

    device = context.device
    if config.prompts_per_step % context.world_size:
        raise UsageError(f"prompts_per_step ({config.prompts_per_step}) must be divisible by the number of processes "
                         f"({context.world_size}): every process rolls out whole groups of its own prompts")
    cache = load_token_cache(config.data)
    layout = layout_for_cache(cache, config.context_frames, config.codebook_size, config.action_bins)
    clips = ClipSampler(cache, layout, config.frame_skip, config.seed)

    torch.manual_seed(config.seed)
    policy = build_world_model(config, layout).to(device)
    tokenizer = load_tokenizer(config.tokenizer, map_location=device).requires_grad_(False)
    lpips = load_lpips(config, device) if "lpips" in config.reward_weights() else None
    trainer = GRPOTrainer(config, policy, layout, tokenizer, lpips, context)

    local_prompts = config.prompts_per_step // context.world_size
    rank_rows = slice(context.rank * local_prompts, (context.rank + 1) * local_prompts)
    sampled_tokens_per_step = config.prompts_per_step * config.group_size * layout.response_len
    last = {}  # the newest step's sums and phase timer

    def step(step: int) -> None:
        sequences = clips.sequences(step, config.prompts_per_step, rank_rows)
        if device.type == "cuda":
            sequences = sequences.pin_memory()
        last["sums"], last["timer"] = trainer.train_step(sequences.to(device, non_blocking=True), step)

    def metrics(done: int, window: LogWindow) -> dict:
        logged = reduce_metrics(last["sums"], last["timer"])  # waits for the device
        elapsed = window.seconds()
        logged.update(lr=window.lr, tokens_per_s=sampled_tokens_per_step * window.steps / elapsed,
                      step_time_s=elapsed / window.steps, nonfinite_skipped=trainer.guard.skipped)
        return logged

    def data_state(done: int) -> dict:
        return {"data": {"seed": config.seed, "next_step": done, "prompts_seen": done * config.prompts_per_step}}

    description = (f"{policy.num_parameters():,} parameters, {layout.mode} sequences of {layout.seq_len} tokens, "
                   f"{config.prompts_per_step} prompts x G={config.group_size} per step")
    return run_stage(config, context, Stage(
        "rl", policy, trainer.optimizer, trainer.scheduler, trainer.guard, step, metrics, data_state, description,
        progress_keys=("reward_mean", "kl", "tokens_per_s"), summary_keys=("reward_mean",)))


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _run(config: RLConfig) -> int:
    print_summary(rl(config))
    return 0


add_cli, main = config_command("rl", "GRPO post-training of the world model (RLVR)", __doc__, RLConfig, _run)

if __name__ == "__main__":
    raise SystemExit(main())
