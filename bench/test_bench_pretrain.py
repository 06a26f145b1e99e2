"""MLE pre-training throughput: one whole optimizer step of ``rlvrw.train.pretrain`` (draw the step's clips from a token
cache, build the single-step sequences of DESIGN.md's layout, forward + backward of the summed frame-token NLL through
``ops.linear_token_logprobs``, gradient clipping, AdamW), as ``rlvrw pretrain`` runs it.

On a GPU: the paper's 120M model, bf16 autocast with fp32 master weights, fused AdamW, SDPA attention (flash-attn
when installed), 16 sequences per step in 2 micro-batches; ``pretrain_step_compiled`` also compiles each decoder layer
(``--compile``). On CPU: the small model (6.6M) in fp32, 2 sequences per step.

``extra_info``: ``tokens_per_s`` (input tokens of the global batch per second, the training throughput), ``mfu``
(model FLOPs per second over the device's dense bf16 peak from its data sheet; GPU only), and through ``flops``
the achieved TFLOP/s and its fraction of the matmul rate measured on this device. Model FLOPs:
``pretrain.training_flops_per_sequence`` (6 x matmul parameters per token, the output layer at the loss positions
only, causal attention), recomputation not counted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlvrw.data import clips as CL
from rlvrw.data import token_cache as TC
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models import WorldModelConfig, WorldModelTransformer
from rlvrw.train import build as B
from rlvrw.train import pretrain as P

LAYOUT = SequenceLayout.single_step()
CACHE_EPISODES, CACHE_FRAMES = 64, 16


def _setup(env):
    """(model config, micro-batch size, micro-batches per step, label) for this device."""
    if env.is_cuda:
        return WorldModelConfig(vocab_size=LAYOUT.vocab_size), 8, 2, "120M"
    return WorldModelConfig.small(vocab_size=LAYOUT.vocab_size), 2, 1, "small (CPU)"


def _sampler() -> CL.ClipSampler:
    rng = np.random.default_rng(0)
    frame_ids = rng.integers(0, LAYOUT.codebook_size, (CACHE_EPISODES, CACHE_FRAMES, LAYOUT.frame_tokens))
    action_bins = rng.integers(0, LAYOUT.action_bins, (CACHE_EPISODES, CACHE_FRAMES, LAYOUT.action_dims))
    cache = TC.TokenCache(frame_ids.astype(np.int16), action_bins.astype(np.uint8),
                         np.full(CACHE_EPISODES, CACHE_FRAMES, dtype=np.int64), codebook_size=LAYOUT.codebook_size)
    return CL.ClipSampler(cache, LAYOUT)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_pretrain_step(bench, bench_env, benchmark, compiled):
    env = bench_env
    if compiled and not env.is_cuda:
        pytest.skip(f"the compiled step is timed on a GPU only (this run is on {env.device_name})")
    model_config, micro_batch, accumulation, label = _setup(env)
    global_batch = micro_batch * accumulation
    sampler = _sampler()
    train = P.PretrainConfig(data="bench", micro_batch_size=micro_batch, grad_accum_steps=accumulation)
    dtype = B.autocast_dtype("auto", env.device)
    loss_tokens = global_batch * int(LAYOUT.tables().loss_mask.sum())
    tokens = global_batch * (LAYOUT.seq_len - 1)
    shape = f"{label} {global_batch}x{LAYOUT.seq_len - 1} tokens"

    def make_state():
        torch.manual_seed(0)
        model = WorldModelTransformer(model_config).to(env.device)
        if compiled:
            for layer in model.model.layers:
                layer.compile()
        loss_module = P.NextTokenLoss(model, LAYOUT).to(env.device)
        optimizer = B.make_optimizer(model, train, fused=env.is_cuda)
        return {"loss": loss_module, "optimizer": optimizer, "scheduler": B.make_scheduler(optimizer, train),
                "step": 0}

    def step(state):
        micro_batches = [sampler.sequences(state["step"], global_batch, slice(row, row + micro_batch)).to(env.device)
                         for row in range(0, global_batch, micro_batch)]
        P.train_step(state["loss"], state["optimizer"], state["scheduler"], micro_batches, loss_tokens,
                     train.grad_clip, dtype, world_size=1)
        state["step"] += 1

    flops = global_batch * B.training_flops_per_sequence(model_config, LAYOUT)
    with B.value_checks_off_on_gpu(env.device):  # as the trainer runs
        bench.run(op="pretrain_step_compiled" if compiled else "pretrain_step", impl="rlvrw", shape=shape,
                  make_state=make_state, step=step, flops=flops,
                  extra={"tokens": tokens, "precision": str(dtype or torch.float32).replace("torch.", ""),
                         "compiled": compiled, "config": model_config.to_hf_dict(),
                         "passes": "sample+fwd+bwd+clip+adamw"})
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["tokens_per_s"] = tokens / seconds
        peak = B.peak_flops(env.device)
        benchmark.extra_info["mfu"] = flops / seconds / peak if peak else None
