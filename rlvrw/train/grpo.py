"""The GRPO update, written once for the video world model (``rlvrw.train.trainer``) and the language world models
(``rlvrw.lang.train``): the loss over micro-batches of a batch of rollouts, each normalized by the whole batch's
token (or sequence) count so that micro-batches and ranks add up to it, backward, gradient clipping, the optimizer
step through the non-finite guard and the learning-rate schedule.

    loss_b = grpo_loss(logp_b, old_logp_b, A_b, mask_b, ref_logp_b; num_tokens=N, num_seqs=S) * world_size
    sum_b d(loss_b)/d(theta) = d(loss of the whole batch over every rank)/d(theta)   (DDP averages over ranks)

The counts are device tensors (``grpo_loss`` would copy a Python number to the device: a sync), and nothing here
reads the device: the returned sums are 0-d device tensors, read when a step is logged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn as nn

import rlvrw.ops as ops
from rlvrw.guard import NonFiniteGuard

# The per-token means of grpo_loss's stats over a micro-batch, summed weighted by its share of the batch's tokens.
WEIGHTED_STATS = ("clip_frac", "clip_frac_lower", "approx_kl")
UPDATE_SUMS = ("loss", "pg_loss", "kl", *WEIGHTED_STATS)


class ScoredRows(NamedTuple):
    """What a stage's scorer gives ``grpo_update`` for one micro-batch of rollouts (rows ``part`` of the batch):
    the policy's log-probs of the sampled tokens (with their graph), the log-probs they were sampled with (None:
    this step's, ``logp.detach()``: one optimizer step per rollout batch), the mask of the tokens that count and
    the KL reference's log-probs (None: no KL term). All (rows, T)."""

    logp: torch.Tensor
    old_logp: torch.Tensor | None
    mask: torch.Tensor
    ref_logp: torch.Tensor | None


def grpo_update(
    score: Callable[[slice], ScoredRows],
    rows: int,
    micro_batch_size: int,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[nn.Parameter],
    *,
    num_tokens: torch.Tensor,
    num_seqs: torch.Tensor | None = None,
    grad_clip: float,
    guard: NonFiniteGuard | None = None,
    step: int | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    world_size: int = 1,
    gradient_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    **loss_options,
) -> dict[str, torch.Tensor]:
    """One optimizer step of GRPO on this rank's ``rows`` rollouts, ``micro_batch_size`` rows at a time.

    ``score(part)`` runs the policy on rows ``part`` (a slice) and returns their ``ScoredRows``; it runs inside
    ``gradient_sync(last)`` (``rlvrw.train.distributed.gradient_sync``: DDP reduces the gradients of the last
    micro-batch only) with its backward. ``advantages`` (rows,) or (rows, T); ``num_tokens`` / ``num_seqs``: the
    whole batch's counts over every rank, 0-d device tensors; ``grad_clip`` <= 0 does not clip; the step goes
    through ``guard`` when given (``step`` names it in its report), then ``scheduler`` steps when given. The update
    starts from no gradient (whatever a caller left) and leaves none (its memory is free during the next rollout).

    Returns this rank's sums, 0-d device tensors: ``loss``, ``pg_loss``, ``kl`` summed over micro-batches,
    ``clip_frac``, ``clip_frac_lower``, ``approx_kl`` as means over the batch's tokens, and ``grad_norm`` (before
    clipping).
    """
    optimizer.zero_grad(set_to_none=True)
    device = advantages.device
    sums = {name: torch.zeros((), device=device) for name in UPDATE_SUMS}
    for start in range(0, rows, micro_batch_size):
        part = slice(start, min(start + micro_batch_size, rows))
        with gradient_sync(part.stop == rows) if gradient_sync else contextlib.nullcontext():
            scored = score(part)
            old_logp = scored.logp.detach() if scored.old_logp is None else scored.old_logp
            loss, stats = ops.grpo_loss(scored.logp, old_logp, advantages[part], scored.mask, scored.ref_logp,
                                        num_tokens=num_tokens, num_seqs=num_seqs, **loss_options)
            (loss * world_size).backward()
        sums["loss"] += loss.detach()
        sums["pg_loss"] += stats["pg_loss"]
        sums["kl"] += stats["kl"]
        # the stats are means over this micro-batch's tokens: weight them by its share of the batch's (1/N * n)
        share = num_tokens.reciprocal() * scored.mask.sum()
        for name in WEIGHTED_STATS:
            sums[name] += stats[name] * share
    grad_norm = nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else float("inf"))
    if guard is None:
        optimizer.step()
    else:
        guard.step(optimizer, step, loss=sums["loss"], pg_loss=sums["pg_loss"], kl=sums["kl"], grad_norm=grad_norm)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = grad_norm.detach()
    return sums
