"""MLE pre-training of the world model on token sequences, and the ``rlvrw pretrain`` command.

Data: a token cache (``rlvrw.data.token_cache``), given with ``--data``, or tokenized first from an episode directory
(``--episodes DIR --tokenizer CKPT``: ``rlvrw.train.tokenize`` writes the cache of its tokenizer's kind into
``OUT/tokens.npz``). Every step's sequences come from ``rlvrw.data.clips.ClipSampler``: a pure function of (seed,
step), the same whatever the split over processes and micro-batches.

Loss and optimization
---------------------
Cross-entropy of the predicted frame tokens (the layout's loss mask), from the final hidden states and the output
layer through ``ops.linear_token_logprobs`` (``rlvrw.train.scoring``): no (B, T, V) logits, and the output layer runs
on the masked positions only. Micro-batch losses are sums divided by the global number of loss tokens, so
accumulation and data parallelism give the gradient of one big batch. AdamW (no weight decay on norms), linear warmup
then cosine decay to ``min_lr_ratio`` of the peak, gradient clipping; bf16 autocast on a GPU (fp32 master weights),
fp32 on CPU.

Runs
----
``OUT/`` receives ``config.json``, ``metrics.jsonl`` (and ``tensorboard/``), ``checkpoints/step_*`` (see
``rlvrw.train.checkpoints``; each one also loads with ``WorldModelTransformer.from_pretrained``) and, at the end,
``model/``: the pre-trained world model for the RL stage. A run finds the newest checkpoint in ``OUT/checkpoints`` and
continues from it; on CPU the continuation is bit-identical to an uninterrupted run. The loop that does all this is
``rlvrw.train.run_loop``'s, shared with ``rlvrw rl``.

    rlvrw pretrain --data tokens.npz --out runs/pretrain --steps 2000
    torchrun --nproc-per-node 8 -m rlvrw.train.pretrain --data tokens.npz --out runs/wm --model base --parallel ddp
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from rlvrw import checks, usage
from rlvrw.data.clips import ClipSampler, episode_stream, layout_for_cache
from rlvrw.data.token_cache import load_token_cache
from rlvrw.guard import ON_NONFINITE, ON_NONFINITE_HELP, NonFiniteGuard
from rlvrw.models.tokenizer import CompressiveTokenizer
from rlvrw.models.transformer import ATTENTION_BACKENDS
from rlvrw.train import distributed
from rlvrw.train.build import (
    MODEL_SIZES,
    PRECISIONS,
    autocast_dtype,
    build_world_model,
    check_training_settings,
    make_optimizer,
    make_scheduler,
    peak_flops,
    training_flops_per_sequence,
)
from rlvrw.train.checkpoints import RESUME_HELP
from rlvrw.train.config import RunConfig, check_model_dir, check_token_cache, config_command, option, print_summary
from rlvrw.train.logging import TENSORBOARD_CHOICES
from rlvrw.train.run_loop import LogWindow, Stage, in_process_group, run_stage
from rlvrw.train.scoring import NextTokenLoss
from rlvrw.train.tokenize import tokenize_clips, tokenize_episodes

logger = logging.getLogger(__name__)

CACHE_FILE = "tokens.npz"


# ----------------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


POSITIVE_INT_FIELDS = ("context_frames", "predicted_frames", "frame_skip", "codebook_size", "action_bins", "steps",
                       "micro_batch_size", "grad_accum_steps", "log_every", "save_every", "keep_checkpoints")
NON_NEGATIVE_FIELDS = ("clip_stride", "warmup_steps", "weight_decay", "grad_clip", "seed", "stop_at_step")


@dataclass
class PretrainConfig(RunConfig):
    """Everything ``pretrain`` needs; every field is also a command-line flag (``--micro-batch-size 8``)."""

    data: str = option("", "token cache: an .npz file or a directory of them (format: rlvrw.data.token_cache)")
    out_dir: str = option("runs/pretrain", "run directory: checkpoints, logs, the final model")
    episodes: str = option("", "instead of --data: a directory of episode .npz files, tokenized first")
    tokenizer: str = option("", "with --episodes: a FrameTokenizer checkpoint (single-step cache) or a "
                                 "CompressiveTokenizer one (multi-step clips; `rlvrw train "
                                 "tokenizer_kind=compressive` trains one)")
    frame_size: tuple[int, int] | None = option(None, "with --episodes: resize frames to H W before tokenizing",
                                       nargs=2, type=int, metavar=("H", "W"))
    context_frames: int = option(4, "frames (with their actions) in the prompt")
    predicted_frames: int = option(7, "with --episodes and a CompressiveTokenizer: frames predicted per "
                                      "multi-step clip (RLVR-World: 7)")
    frame_skip: int = option(1, "steps between the frames of a clip")
    clip_stride: int = option(0, "with --episodes and a CompressiveTokenizer: frames between the starts of an "
                                 "episode's clips (0: a clip's span, no overlap)")
    codebook_size: int = option(4375, "frame codebook size, when the cache does not store it")
    action_bins: int = option(256, "bins per action dimension")
    model: str = option("small", "model size: 'small' (CPU-sized) or 'base' (the paper's 120M)",
                         choices=MODEL_SIZES)
    model_overrides: dict = option({}, "WorldModelConfig fields over the size's, as JSON", type=json.loads)
    copy_prior: bool = option(False, "a fresh model gets the learned copy prior: each frame token's input also "
                                      "embeds the id at its place in the previous frame (WorldModelConfig."
                                      "copy_prior_offset)")
    init_from: str = option("", "start from this Hugging Face LlamaForCausalLM directory instead")
    attention_backend: str = option("auto", "attention kernels", choices=ATTENTION_BACKENDS)
    steps: int = option(1000, "optimizer steps of the whole schedule")
    micro_batch_size: int = option(8, "sequences per forward pass, per process")
    grad_accum_steps: int = option(1, "micro-batches per step (global batch = micro x accum x processes)")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this fraction of the peak")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.01, "AdamW weight decay (not on norm weights)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas", nargs=2, type=float, metavar=("B1", "B2"))
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = option(0, "seeds the initialization and the clips")
    precision: str = option("auto", "auto (bf16 autocast on a GPU, fp32 on CPU), bf16 or fp32", choices=PRECISIONS)
    device: str = option("auto", "auto, cpu or cuda")
    parallel: str = option("ddp", "data parallelism under torchrun: ddp or fsdp (FSDP2)",
                            choices=distributed.STRATEGIES)
    compile: bool = option(False, "torch.compile each decoder layer")
    log_every: int = option(10, "log every this many steps")
    save_every: int = option(500, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept (older ones are deleted)")
    resume: bool | None = option(None, RESUME_HELP)
    on_nonfinite: str = option("stop", ON_NONFINITE_HELP, choices=ON_NONFINITE)
    stop_at_step: int = option(0, "end this run after this step, schedule unchanged (0: train all steps)")
    tensorboard: str = option("auto", "TensorBoard logs: auto (when installed), on or off",
                               choices=TENSORBOARD_CHOICES)
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        super().__post_init__()
        if self.frame_size is not None:
            self.frame_size = tuple(self.frame_size)
        self.betas = tuple(self.betas)
        for name in POSITIVE_INT_FIELDS:
            checks.integer(name, getattr(self, name))
        for name in NON_NEGATIVE_FIELDS:
            checks.number(name, getattr(self, name), low=0)
        checks.positive("lr", self.lr)
        check_training_settings(self)
        if self.frame_size is not None and (len(self.frame_size) != 2 or min(self.frame_size) < 1):
            raise ValueError(f"frame_size must be (H, W) positive, got {self.frame_size!r}")
        if bool(self.data) == bool(self.episodes):
            raise ValueError("give exactly one of data (a token cache) and episodes (with tokenizer)")
        if self.episodes and not self.tokenizer:
            raise ValueError("episodes needs tokenizer: the FrameTokenizer or CompressiveTokenizer checkpoint that "
                             "codes the frames")

    def check_inputs(self) -> None:
        """The files a run reads must exist (``rlvrw.usage``'s one-line errors), and ``out_dir`` be no file."""
        if self.data:
            check_token_cache("data", self.data)
        else:
            usage.existing_dir("episodes", self.episodes, "a directory of episode .npz files", "*.npz")
            usage.existing_file("tokenizer", self.tokenizer, "a tokenizer checkpoint from `rlvrw tokenizer`")
        if self.init_from:
            check_model_dir("init_from", self.init_from)
        usage.output_dir("out_dir", self.out_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------

def train_step(
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    micro_batches: list[torch.Tensor],
    global_loss_tokens: int,
    grad_clip: float,
    dtype: torch.dtype | None,
    world_size: int,
    guard: NonFiniteGuard | None = None,
    step: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches of whole sequences; returns (this rank's summed NLL,
    the gradient norm before clipping), 0-d tensors on the device (no host sync).

    Each micro-batch's summed NLL is divided by ``global_loss_tokens`` (all ranks, all micro-batches) and multiplied
    by ``world_size``, which undoes the data-parallel averaging: the gradient is that of the global mean. With a
    ``guard`` (``rlvrw.guard``), the update of a step whose loss or gradient norm is not finite is not applied.
    """
    device = micro_batches[0].device
    scale = world_size / global_loss_tokens
    nll_sum = torch.zeros((), device=device)
    for index, ids in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with distributed.gradient_sync(wrapped, last):
            with autocast:
                nll = wrapped(ids)
            (nll * scale).backward()
        nll_sum += nll.detach().float()
    grad_norm = nn.utils.clip_grad_norm_(wrapped.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    if guard is None:
        optimizer.step()
    else:
        guard.step(optimizer, step, loss=nll_sum, grad_norm=grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return nll_sum, grad_norm


def prepare_token_cache(config: PretrainConfig, context: distributed.DistributedContext) -> Path:
    """The token cache to train on: ``config.data``, or ``OUT/tokens.npz`` tokenized from ``config.episodes`` by rank 0
    (once: an existing one is reused) while the other ranks wait: frame by frame with a ``FrameTokenizer``, as
    multi-step clips with a ``CompressiveTokenizer``."""
    if config.data:
        return Path(config.data)
    cache_path = Path(config.out_dir) / CACHE_FILE
    if context.is_main and not cache_path.is_file():
        from rlvrw.models.tokenizer_files import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer).to(context.device)
        episodes = episode_stream(config.episodes, config.frame_size, action_bins=config.action_bins)
        if isinstance(tokenizer, CompressiveTokenizer):
            summary = tokenize_clips(tokenizer, episodes, cache_path, context_frames=config.context_frames,
                                     predicted_frames=config.predicted_frames, frame_skip=config.frame_skip,
                                     clip_stride=config.clip_stride, progress=config.progress)
            logger.info("tokenized %(clips)d clips of %(episodes)d episodes (%(skipped)d skipped) into %(path)s",
                        summary)
        else:
            summary = tokenize_episodes(tokenizer, episodes, cache_path, progress=config.progress)
            logger.info("tokenized %(episodes)d episodes (%(frames)d frames, %(skipped)d skipped) into %(path)s",
                        summary)
    distributed.barrier()
    return cache_path

def pretrain(config: PretrainConfig) -> dict:
    """Train (or continue training) the world model as ``config`` says; see the module doc. Under torchrun every
    process calls this. Returns a summary: {"step", "loss", "tokens_per_s", "checkpoint", "model_dir",
    "nonfinite_skipped"}."""
    return in_process_group(config, _train)


def _train(config: PretrainConfig, context: distributed.DistributedContext) -> dict:
    cache = load_token_cache(prepare_token_cache(config, context))
    layout = layout_for_cache(cache, config.context_frames, config.codebook_size, config.action_bins)
    # the clips of a multi-step cache tokenized here were cut with frame_skip already: a row's frames are consecutive
    row_skip = 1 if config.episodes and cache.context_ids is not None else config.frame_skip
    sampler = ClipSampler(cache, layout, row_skip, config.seed)

    torch.manual_seed(config.seed)
    world_model = build_world_model(config, layout).to(context.device)
    if config.compile:
        for layer in world_model.model.layers:
            layer.compile()
    dtype = autocast_dtype(config.precision, context.device)
    loss_module = NextTokenLoss(world_model, layout).to(context.device)
    wrapped = distributed.wrap_model(loss_module, context, config.parallel, shard_units=world_model.model.layers,
                                     param_dtype=dtype)
    fused = context.device.type == "cuda" and not (context.distributed and config.parallel == "fsdp")
    optimizer = make_optimizer(world_model, config, fused)
    scheduler = make_scheduler(optimizer, config)
    guard = NonFiniteGuard(config.on_nonfinite, "pretrain")

    global_batch = config.micro_batch_size * config.grad_accum_steps * context.world_size
    loss_tokens_per_sequence = int(layout.tables().loss_mask.sum())
    global_loss_tokens = global_batch * loss_tokens_per_sequence
    tokens_per_step = global_batch * (layout.seq_len - 1)
    flops_per_step = global_batch * training_flops_per_sequence(world_model.config, layout)
    peak = peak_flops(context.device) if dtype == torch.bfloat16 else None
    rank_rows = config.micro_batch_size * config.grad_accum_steps
    first_row = context.rank * rank_rows
    nll_since_log = torch.zeros((), device=context.device)
    grad_norm = None

    def step(step: int) -> None:
        nonlocal nll_since_log, grad_norm
        micro_batches = [
            sampler.sequences(step, global_batch, slice(row, row + config.micro_batch_size)).to(context.device)
            for row in range(first_row, first_row + rank_rows, config.micro_batch_size)
        ]
        nll, grad_norm = train_step(wrapped, optimizer, scheduler, micro_batches, global_loss_tokens,
                                    config.grad_clip, dtype, context.world_size, guard, step + 1)
        nll_since_log += nll

    def metrics(done: int, window: LogWindow) -> dict:
        nonlocal nll_since_log
        loss = distributed.all_reduce_sum(nll_since_log).item() / (global_loss_tokens * window.steps)
        elapsed = window.seconds()  # after the .item() above: the device has finished
        logged = {
            "loss": loss, "lr": window.lr, "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_step * window.steps / elapsed,
            "step_time_s": elapsed / window.steps, "tokens": done * tokens_per_step,
            "nonfinite_skipped": guard.skipped,
        }
        if peak is not None:
            logged["mfu"] = flops_per_step * window.steps / elapsed / peak
        nll_since_log = torch.zeros((), device=context.device)
        return logged

    def data_state(done: int) -> dict:
        return {"data": {"seed": config.seed, "next_step": done, "sequences_seen": done * global_batch},
                "tokens": done * tokens_per_step}

    description = (f"{world_model.num_parameters():,} parameters, {layout.mode} sequences of {layout.seq_len} tokens, "
                   f"global batch {global_batch}")
    return run_stage(config, context, Stage(
        "pretrain", world_model, optimizer, scheduler, guard, step, metrics, data_state, description,
        progress_keys=("loss", "lr", "tokens_per_s"), summary_keys=("loss", "tokens_per_s")))


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _run(config: PretrainConfig) -> int:
    print_summary(pretrain(config))
    return 0


add_cli, main = config_command("pretrain", "MLE pre-training of the world model on token sequences", __doc__,
                               PretrainConfig, _run)

if __name__ == "__main__":
    raise SystemExit(main())
