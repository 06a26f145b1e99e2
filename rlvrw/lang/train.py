"""Training Hugging Face causal LMs as language world models: SFT (LoRA by default) and GRPO.

Both use the video path's ops: token log-probs come from the model's last hidden states and its output-layer weight
through ``ops.linear_token_logprobs`` (the (tokens, vocabulary) logits are never held whole), and GRPO's loss is
``ops.grpo_loss`` on group-relative advantages from ``ops.group_advantages``.

A batch holds prompts left-padded to a common length P and responses right-padded to R, so the response tokens sit
in the same columns for every row: the hidden state at column P - 1 + t predicts response token t.

    SFT loss  = - sum_{b,t} mask * log p(response_t | prompt, response_<t) / sum mask     (the answer only)
    GRPO      : G samples per prompt at temperature T, r = task reward, A = (r - mean_g) / (std_g + eps),
                loss = grpo_loss(logp, old_logp, A, mask, ref_logp, clip, dual clip, k3 KL), one optimizer step
                per batch of rollouts (so old_logp = logp.detach(): the sampler is the current policy)

The KL reference is the starting model: with LoRA, the same network with its adapters switched off (no second copy);
with full fine-tuning, a frozen copy loaded from the same directory.

Optimizer steps go through ``rlvrw.guard.NonFiniteGuard``: a non-finite loss or gradient norm stops the run before
its update (``on_nonfinite="stop"``) or skips and counts the update (``"skip"``); a model with a non-finite weight is
never saved.

Loading, LoRA and saving the models: ``rlvrw.lang.hf_model``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch

from rlvrw import checks, ops
from rlvrw.guard import NonFiniteGuard, check_on_nonfinite
from rlvrw.lang.hf_model import (
    DTYPES,
    LoraSettings,
    add_lora,
    causal_lm,
    enable_gradient_checkpointing,
    is_lora,
    load_model,
    load_text_tokenizer,
    require_peft,
    resolve_device,
    resolve_dtype,
    save_model,
    trainable_parameters,
)
from rlvrw.lang.tasks import Task, encode_prompt, encode_response
from rlvrw.train import grpo as train_grpo
from rlvrw.usage import UsageError

# Deprecated names, kept for one release: the HF helpers live in rlvrw.lang.hf_model, and the text tokenizer's loader is
# load_text_tokenizer (rlvrw.models.tokenizer_files.load_tokenizer loads the video tokenizer).
from rlvrw.lang.hf_model import merged_copy, merged_weights, transformers  # noqa: E402,F401
load_tokenizer = load_text_tokenizer

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
FINAL_MODEL = "model"


# ------------------------------------------------------------------------------------------------------ settings
@dataclass
class LanguageRunConfig:
    """What SFT and GRPO runs share. ``lora=None`` trains every weight."""

    model: str
    out_dir: str
    lora: LoraSettings | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 4
    max_prompt_tokens: int = 4096
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    save_every: int = 0
    seed: int = 0
    on_nonfinite: str = "stop"  # rlvrw.guard: "stop" the run at a non-finite loss or gradient norm, or "skip" the step

    def __post_init__(self):
        if not isinstance(self.model, str) or not os.path.isdir(self.model):
            raise ValueError(f"model must be a local model directory, got {self.model!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"out_dir must be a directory path, got {self.out_dir!r}")
        checks.positive("lr", self.lr)
        checks.positive("weight_decay", self.weight_decay, allow_zero=True)
        checks.positive("max_grad_norm", self.max_grad_norm)
        checks.integer("micro_batch_size", self.micro_batch_size)
        checks.integer("max_prompt_tokens", self.max_prompt_tokens)
        checks.integer("save_every", self.save_every, low=0)
        checks.choice("dtype", self.dtype, tuple(DTYPES))
        check_on_nonfinite(self.on_nonfinite)


@dataclass
class SFTConfig(LanguageRunConfig):
    """Supervised fine-tuning on the gold answers. LoRA (rank 32, alpha 16, all linear layers) unless ``lora=None``."""

    lora: LoraSettings | None = field(default_factory=LoraSettings)
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    max_response_tokens: int = 4096

    def __post_init__(self):
        super().__post_init__()
        checks.integer("epochs", self.epochs)
        if self.max_steps is not None:
            checks.integer("max_steps", self.max_steps)
        checks.integer("batch_size", self.batch_size)
        checks.integer("max_response_tokens", self.max_response_tokens)


@dataclass
class GRPOConfig(LanguageRunConfig):
    """GRPO as RLVR-World runs it on language world models: group 5, k3 KL 1e-3 to the starting model, lr 1e-6
    (full fine-tuning; LoRA usually wants about ten times more), clip 0.2, dual clip 3."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 5
    temperature: float = 1.0
    max_new_tokens: int = 2048
    kl_coef: float = 1e-3
    kl_type: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    backend: str = "auto"
    generate_batch_size: int = 32
    reward_workers: int = 2
    vllm_gpu_memory_utilization: float = 0.4

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "prompts_per_step", "max_new_tokens", "generate_batch_size"):
            checks.integer(name, getattr(self, name))
        checks.integer("group_size", self.group_size, low=2)  # advantages compare samples
        checks.positive("temperature", self.temperature)
        checks.positive("kl_coef", self.kl_coef, allow_zero=True)
        checks.integer("reward_workers", self.reward_workers, low=0)
        checks.choice("backend", self.backend, BACKENDS)
        # the loss options are checked by ops.GRPOOptions, which names the bad one
        ops.GRPOOptions(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
                        kl_coef=self.kl_coef, kl_type=self.kl_type)


BACKENDS = ("auto", "hf", "vllm")


# ------------------------------------------------------------------------------------------------------- batches
@dataclass
class TokenBatch:
    """Prompts left-padded to P columns then responses right-padded to R columns.

    input_ids, attention_mask: (B, P + R); response_ids, response_mask: (B, R) (pad ids replaced by 0, any valid id).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    def to(self, device) -> TokenBatch:
        # not dataclasses.astuple: it deep-copies the tensors
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_ids.to(device),
                          self.response_mask.to(device))

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows ``start:stop``, with the columns that are padding in all of them cut off."""
        mask = self.attention_mask[start:stop]
        prompt_len = self.prompt_len
        first = int((mask[:, :prompt_len].sum(0) > 0).nonzero().min())
        keep = int(self.response_mask[start:stop].sum(1).max())
        cols = slice(first, prompt_len + max(keep, 1))
        return TokenBatch(self.input_ids[start:stop, cols], mask[:, cols],
                          self.response_ids[start:stop, :max(keep, 1)], self.response_mask[start:stop, :max(keep, 1)])


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenBatch:
    """The ``TokenBatch`` of token-id lists (one response per prompt)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"prompts and responses must be non-empty and of one length, got {len(prompts)} and "
                         f"{len(responses)}")
    if any(not p for p in prompts):
        raise ValueError("prompts must not be empty token lists")
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    n = len(prompts)
    input_ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width_p + width_r), dtype=torch.long)
    response_ids = torch.zeros((n, width_r), dtype=torch.long)
    response_mask = torch.zeros((n, width_r), dtype=torch.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, width_p - len(prompt):width_p] = torch.tensor(prompt)
        attention_mask[row, width_p - len(prompt):width_p + len(response)] = 1
        if response:
            input_ids[row, width_p:width_p + len(response)] = torch.tensor(response)
            response_ids[row, :len(response)] = torch.tensor(response)
            response_mask[row, :len(response)] = 1
    return TokenBatch(input_ids, attention_mask, response_ids, response_mask)


def _row_slices(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


# ------------------------------------------------------------------------------------------------------ log-probs
def response_logprobs(model, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) float32 log-probs of the response tokens under ``model`` at ``temperature``.

    The decoder's last hidden states (final norm applied) go with the output layer's weight to
    ``ops.linear_token_logprobs``; positions come from the attention mask, as in generation with left padding.
    """
    lm = causal_lm(model)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = lm.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    start = batch.prompt_len - 1
    hidden = hidden[:, start:start + batch.response_ids.shape[1]]
    weight = lm.get_output_embeddings().weight
    return ops.linear_token_logprobs(hidden.to(weight.dtype), weight, batch.response_ids, temperature)


@torch.no_grad()
def reference_logprobs(policy, reference, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs under the KL reference: ``reference`` when given, else ``policy`` with its LoRA adapters off."""
    if reference is not None:
        return response_logprobs(reference, batch, temperature)
    if not is_lora(policy):
        raise ValueError("reference must be given when the policy has no LoRA adapters to switch off")
    with policy.disable_adapter():
        return response_logprobs(policy, batch, temperature)


# ------------------------------------------------------------------------------------------------------------ SFT
def sft_loss(model, batch: TokenBatch, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """``- sum(mask * logp) / num_tokens`` over the response tokens; ``num_tokens`` defaults to this batch's count
    (pass the whole batch's count when this is one micro-batch of it)."""
    logp = response_logprobs(model, batch)
    total = batch.response_mask.sum() if num_tokens is None else num_tokens
    return -(logp * batch.response_mask).sum() / total


def sft_update(model, optimizer, batch: TokenBatch, micro_batch_size: int, max_grad_norm: float,
               guard: NonFiniteGuard | None = None, step: int | None = None) -> dict:
    """One optimizer step on ``batch``, in micro-batches: returns the loss (token mean) and the gradient norm. With
    a ``guard``, the step is taken through it (``step`` names it in its report)."""
    num_tokens = batch.response_mask.sum()
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=num_tokens.device)
    for start, stop in _row_slices(batch.input_ids.shape[0], micro_batch_size):
        loss = sft_loss(model, batch.rows(start, stop), num_tokens)
        loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    _optimizer_step(optimizer, guard, step, loss=total, grad_norm=grad_norm)
    return {"loss": float(total), "grad_norm": float(grad_norm)}


def _optimizer_step(optimizer, guard: NonFiniteGuard | None, step: int | None, **terms) -> None:
    if guard is None:
        optimizer.step()
    else:
        guard.step(optimizer, step, **terms)


# ----------------------------------------------------------------------------------------------------------- GRPO
def grpo_batch_loss(policy, batch: TokenBatch, advantages, old_logp, ref_logp, *, temperature: float = 1.0,
                    num_tokens=None, **loss_options):
    """``ops.grpo_loss`` of ``policy`` on ``batch``: ``(loss, stats, logp)``. ``old_logp=None`` takes the
    log-probs just computed (on-policy: ratio 1, the gradient is the plain policy gradient)."""
    logp = response_logprobs(policy, batch, temperature)
    old = logp.detach() if old_logp is None else old_logp
    loss, stats = ops.grpo_loss(logp, old, advantages, batch.response_mask, ref_logp, num_tokens=num_tokens,
                                **loss_options)
    return loss, stats, logp


def grpo_update(policy, optimizer, batch: TokenBatch, advantages: torch.Tensor, ref_logp: torch.Tensor | None, *,
                micro_batch_size: int, max_grad_norm: float, temperature: float = 1.0,
                guard: NonFiniteGuard | None = None, step: int | None = None, **loss_options) -> dict:
    """One optimizer step of GRPO on a batch of rollouts: ``rlvrw.train.grpo.grpo_update`` (the video trainer's),
    in micro-batches with the padding columns cut off, token-mean over the whole batch, on-policy (one step per
    rollout batch), through ``guard`` when given.

    Returns the loss and its parts summed over micro-batches, the clip fractions and approximate KL, the gradient
    norm (floats: read once, here) and the old log-probs used (B, R).
    """
    old_logp = torch.zeros_like(batch.response_mask)

    def score(part: slice) -> train_grpo.ScoredRows:
        micro = batch.rows(part.start, part.stop)
        width = micro.response_ids.shape[1]
        logp = response_logprobs(policy, micro, temperature)
        old_logp[part, :width] = logp.detach()
        ref = ref_logp[part, :width] if ref_logp is not None else None
        return train_grpo.ScoredRows(logp, None, micro.response_mask, ref)

    sums = train_grpo.grpo_update(score, batch.input_ids.shape[0], micro_batch_size, advantages, optimizer,
                                  trainable_parameters(policy), num_tokens=batch.response_mask.sum(),
                                  grad_clip=max_grad_norm, guard=guard, step=step, **loss_options)
    values = torch.stack(list(sums.values())).tolist()  # one read of the device
    return {**dict(zip(sums, values)), "old_logp": old_logp}


# ------------------------------------------------------------------------------------------------------ the runs
def _setup(cfg: LanguageRunConfig):
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.lora is not None:
        require_peft()  # before the model loads: a missing package is said at once
    tokenizer = load_text_tokenizer(cfg.model)
    model = load_model(cfg.model, device, dtype)
    if cfg.lora is not None:
        model.requires_grad_(False)
        model = add_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    os.makedirs(cfg.out_dir, exist_ok=True)
    return device, dtype, tokenizer, model, optimizer


def _encode_examples(task: Task, tokenizer, records: list[dict], max_prompt_tokens: int,
                     max_response_tokens: int | None) -> tuple[list[tuple], list[str]]:
    """(prompt ids, response ids or None, record) per usable record, and a line per record left out (too long)."""
    examples, skipped = [], []
    for index, record in enumerate(records):
        prompt = encode_prompt(tokenizer, task.build_prompt(record))
        response = encode_response(tokenizer, task.gold_response(record)) if max_response_tokens else None
        if len(prompt) > max_prompt_tokens:
            skipped.append(f"record {index}: prompt of {len(prompt)} tokens > max_prompt_tokens {max_prompt_tokens}")
        elif response is not None and len(response) > max_response_tokens:
            skipped.append(f"record {index}: answer of {len(response)} tokens > max_response_tokens "
                           f"{max_response_tokens}")
        else:
            examples.append((prompt, response, record))
    for line in skipped:
        log.warning("skipping %s", line)
    if not examples:
        raise UsageError(f"records must hold at least one example that fits the token limits ({len(skipped)} "
                         "left out)")
    return examples, skipped


class _Log:
    """Appends one JSON line per step to ``out_dir/log.jsonl`` and shows progress."""

    def __init__(self, out_dir: str, total: int, desc: str):
        from tqdm import tqdm

        self.file = open(os.path.join(out_dir, LOG_FILE), "a", encoding="utf-8")
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def step(self, record: dict, shown: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def run_sft(task: Task, records: list[dict], cfg: SFTConfig) -> dict:
    """Fine-tune ``cfg.model`` on the gold answers of ``records``; the model goes to ``cfg.out_dir/model``.

    Returns a summary: steps, first and last loss, records left out for length.
    """
    device, _, tokenizer, model, optimizer = _setup(cfg)
    examples, skipped = _encode_examples(task, tokenizer, records, cfg.max_prompt_tokens, cfg.max_response_tokens)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    progress = _Log(cfg.out_dir, total, "sft")
    guard = NonFiniteGuard(cfg.on_nonfinite, "sft")
    losses, step = [], 0
    try:
        for epoch in range(cfg.epochs):
            order = random.sample(range(len(examples)), len(examples))
            for start in range(0, len(order), cfg.batch_size):
                if step >= total:
                    break
                chosen = [examples[i] for i in order[start:start + cfg.batch_size]]
                batch = pack([e[0] for e in chosen], [e[1] for e in chosen], tokenizer.pad_token_id).to(device)
                stats = sft_update(model, optimizer, batch, cfg.micro_batch_size, cfg.max_grad_norm, guard, step + 1)
                stats["nonfinite_skipped"] = guard.check()
                step += 1
                losses.append(stats["loss"])
                progress.step({"step": step, "epoch": epoch, **stats}, {"loss": stats["loss"]})
                if cfg.save_every and step % cfg.save_every == 0:
                    save_model(model, tokenizer, os.path.join(cfg.out_dir, f"step-{step:06d}"), {"step": step})
    finally:
        progress.close()
    summary = {"steps": step, "first_loss": losses[0], "last_loss": losses[-1], "examples": len(examples),
               "skipped": skipped, "nonfinite_skipped": guard.check()}
    save_model(model, tokenizer, os.path.join(cfg.out_dir, FINAL_MODEL), summary)
    return summary


def make_rollout(cfg: GRPOConfig, model, tokenizer, dtype: torch.dtype):
    """The rollout backend ``cfg.backend`` names; ``auto`` is vLLM when it is installed and a GPU is there."""
    from rlvrw.lang import rollout

    backend = cfg.backend
    if backend == "auto":
        backend = "vllm" if rollout.vllm_available() else "hf"
    if backend == "vllm":
        return rollout.VLLMRollout(
            cfg.model, rollout.stop_token_ids(model, tokenizer), max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            dtype=str(dtype).removeprefix("torch."), max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
            seed=cfg.seed,
        )
    return rollout.HFRollout(model, tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             batch_size=cfg.generate_batch_size)


def run_grpo(task: Task, records: list[dict], cfg: GRPOConfig) -> dict:
    """GRPO on ``records`` with the task's reward; the model goes to ``cfg.out_dir/model``.

    Each step samples ``prompts_per_step`` records (cycling through them in shuffled order), draws ``group_size``
    responses each, scores them in the reward pool while the reference log-probs are computed, and takes one
    optimizer step. Returns a summary with the mean reward of the first and last steps.
    """
    from rlvrw.lang.reward_pool import RewardPool

    device, dtype, tokenizer, policy, optimizer = _setup(cfg)
    reference = None if cfg.lora is not None else load_model(cfg.model, device, dtype, trainable=False)
    examples, skipped = _encode_examples(task, tokenizer, records, cfg.max_prompt_tokens, None)
    sampler = make_rollout(cfg, policy, tokenizer, dtype)
    loss_options = {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "dual_clip": cfg.dual_clip,
                    "kl_coef": cfg.kl_coef, "kl_type": cfg.kl_type}
    progress = _Log(cfg.out_dir, cfg.steps, "grpo")
    guard = NonFiniteGuard(cfg.on_nonfinite, "grpo")
    order: list[int] = []
    history = []
    try:
        with RewardPool(task.score, cfg.reward_workers) as pool:
            for step in range(1, cfg.steps + 1):
                started = time.perf_counter()
                chosen = []
                while len(chosen) < min(cfg.prompts_per_step, len(examples)):
                    order = order or random.sample(range(len(examples)), len(examples))
                    chosen.append(examples[order.pop()])
                rollouts = sampler.generate([e[0] for e in chosen], cfg.group_size)
                group_records = [e[2] for e in chosen for _ in range(cfg.group_size)]
                pending = pool.submit(rollouts.texts, group_records)
                batch = pack(rollouts.prompt_ids, rollouts.response_ids, tokenizer.pad_token_id).to(device)
                ref_logp = None
                if cfg.kl_coef > 0:
                    ref_logp = torch.cat([
                        _pad_cols(reference_logprobs(policy, reference, batch.rows(a, b), cfg.temperature),
                                  batch.response_ids.shape[1])
                        for a, b in _row_slices(len(group_records), cfg.micro_batch_size)
                    ])
                scored = pending.result()
                rewards = torch.tensor(scored.rewards, dtype=torch.float32, device=device)
                advantages = ops.group_advantages(rewards, cfg.group_size)
                stats = grpo_update(policy, optimizer, batch, advantages, ref_logp,
                                    micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm,
                                    temperature=cfg.temperature, guard=guard, step=step, **loss_options)
                sampler.sync_weights(policy)
                entry = {
                    "step": step, "reward": float(rewards.mean()), "loss": stats["loss"], "pg_loss": stats["pg_loss"],
                    "kl": stats["kl"], "grad_norm": stats["grad_norm"],
                    "unparseable": scored.parsed.count(False), "scoring_errors": len(scored.errors),
                    "truncated": sum(rollouts.truncated),
                    "response_tokens": float(batch.response_mask.sum(1).mean()),
                    "nonfinite_skipped": guard.check(),
                    "seconds": time.perf_counter() - started,
                }
                if rollouts.sample_logprobs is not None:
                    entry["sampler_logp_gap"] = sampler_logprob_gap(rollouts.sample_logprobs, stats["old_logp"], batch)
                history.append(entry)
                progress.step(entry, {"reward": entry["reward"], "kl": entry["kl"]})
                if cfg.save_every and step % cfg.save_every == 0:
                    save_model(policy, tokenizer, os.path.join(cfg.out_dir, f"step-{step:06d}"), entry)
    finally:
        progress.close()
    summary = {"steps": cfg.steps, "first_reward": history[0]["reward"], "last_reward": history[-1]["reward"],
               "examples": len(examples), "skipped": skipped, "nonfinite_skipped": guard.check()}
    save_model(policy, tokenizer, os.path.join(cfg.out_dir, FINAL_MODEL), summary)
    return summary


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def sampler_logprob_gap(sample_logprobs: list[list[float]], trainer_logp: torch.Tensor, batch: TokenBatch) -> float:
    """Mean |sampler log-prob - trainer log-prob| over response tokens: how far the rollout engine's numbers are
    from the trainer's (a weight-sync or precision problem shows here first)."""
    sampler = torch.zeros_like(trainer_logp)
    for row, values in enumerate(sample_logprobs):
        sampler[row, :len(values)] = torch.tensor(values[:sampler.shape[1]], dtype=sampler.dtype)
    mask = batch.response_mask
    return float(((sampler - trainer_logp).abs() * mask).sum() / mask.sum().clamp(min=1))


# ----------------------------------------------------------------------------------------------------- evaluation
def generate_responses(task: Task, records: list[dict], model_dir: str, *, max_new_tokens: int = 2048,
                       temperature: float = 0.0, batch_size: int = 16, device: str = "auto",
                       dtype: str = "auto") -> list[str]:
    """One response per record from the model in ``model_dir`` (greedy by default), with the HF backend."""
    from rlvrw.lang.rollout import HFRollout

    torch_device = resolve_device(device)
    tokenizer = load_text_tokenizer(model_dir)
    model = load_model(model_dir, torch_device, resolve_dtype(dtype, torch_device), trainable=False)
    sampler = HFRollout(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=batch_size)
    prompts = [encode_prompt(tokenizer, task.build_prompt(r)) for r in records]
    return sampler.generate(prompts, 1).texts
