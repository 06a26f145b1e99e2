"""What a trainer builds before its first step, shared by pre-training and RL: the world model, AdamW and its
learning-rate schedule, the autocast precision, the training FLOPs (for MFU), and value checks off on a GPU."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn as nn

import rlvrw.ops as ops
from rlvrw import checks
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models.transformer import WorldModelConfig, WorldModelTransformer
from rlvrw.train import checkpoints
from rlvrw.usage import UsageError

PRECISIONS = ("auto", "bf16", "fp32")
MODEL_SIZES = ("small", "base")
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU; matched against the device name.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12),
)


def check_training_settings(config) -> None:
    """The settings every trainer of the world model shares (pre-training and RL configs call this from
    ``__post_init__``): the learning-rate floor, AdamW's betas, the model overrides and where a run may stop."""
    checks.number("min_lr_ratio", config.min_lr_ratio, 0, 1)
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {config.betas!r}")
    if not isinstance(config.model_overrides, dict):
        raise ValueError(f"model_overrides must be a dict of WorldModelConfig fields, got {config.model_overrides!r}")
    unknown = sorted(set(config.model_overrides) - {f.name for f in dataclasses.fields(WorldModelConfig)})
    if unknown:
        raise ValueError(f"model_overrides has keys that are not WorldModelConfig fields: {unknown}")
    if config.stop_at_step > config.steps:
        raise ValueError(f"stop_at_step ({config.stop_at_step}) must be at most steps ({config.steps})")


def build_world_model(config, layout: SequenceLayout) -> WorldModelTransformer:
    """The model to train: ``init_from``'s weights, or a fresh one of the configured size and the layout's vocab."""
    if config.init_from:
        model = checkpoints.load_model(config.init_from, "init_from", attention_backend=config.attention_backend)
    else:
        sizes = dict(vocab_size=layout.vocab_size, max_position_embeddings=max(layout.seq_len, 8192))
        if getattr(config, "copy_prior", False):  # rlvrw rl's fresh models have none
            sizes["copy_prior_offset"] = layout.copy_offset
        sizes.update(config.model_overrides)
        model_config = WorldModelConfig.small(**sizes) if config.model == "small" else WorldModelConfig(**sizes)
        model = WorldModelTransformer(model_config, attention_backend=config.attention_backend)
    if model.config.vocab_size < layout.vocab_size or model.config.max_position_embeddings < layout.seq_len:
        raise UsageError(f"the model (vocab {model.config.vocab_size}, {model.config.max_position_embeddings} "
                         f"positions) cannot read the layout's sequences (vocab {layout.vocab_size}, "
                         f"{layout.seq_len} tokens)")
    return model


def make_optimizer(model: nn.Module, config, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm weights (vectors)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning rate of ``step`` (0-based) over the peak: linear warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = functools.partial(lr_factor, warmup_steps=config.warmup_steps, total_steps=config.steps,
                                 min_ratio=config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device`` (None: plain fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def training_flops_per_sequence(model_config: WorldModelConfig, layout: SequenceLayout) -> int:
    """Model FLOPs of forward + backward of one sequence as trained here: 6 x the matmul parameters per input token
    (the output layer only at the loss positions), plus causal attention, 6 x layers x width x T^2 (half of the
    non-causal 12). Backward recomputation is not counted (MFU's convention)."""
    hidden, vocab = model_config.hidden_size, model_config.vocab_size
    attention_width = model_config.num_attention_heads * model_config.head_dim
    kv_width = model_config.num_key_value_heads * model_config.head_dim
    per_layer = hidden * (2 * attention_width + 2 * kv_width) + 3 * hidden * model_config.intermediate_size
    tokens = layout.seq_len - 1
    loss_tokens = int(layout.tables().loss_mask.sum())
    body = 6 * model_config.num_hidden_layers * per_layer * tokens
    head = 6 * hidden * vocab * loss_tokens
    attention = 6 * model_config.num_hidden_layers * attention_width * tokens * tokens
    return body + head + attention


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s when it is a GPU listed in ``PEAK_BF16_FLOPS``, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)

@contextlib.contextmanager
def value_checks_off_on_gpu(device: torch.device):
    """On a GPU, turn off the ops' checks of tensor values within the context: the cache's ids were range-checked
    once when it loaded, and checking every micro-batch again would sync with the GPU each time."""
    if device.type != "cuda":
        yield
        return
    previous = checks.value_checks_enabled(torch.empty(0))
    ops.set_value_checks(False)
    try:
        yield
    finally:
        ops.set_value_checks(previous)
