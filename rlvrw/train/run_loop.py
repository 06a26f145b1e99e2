"""The run loop of every training stage (``rlvrw pretrain``, ``rlvrw rl``), written once: torch.distributed set up
and torn down around the run (``in_process_group``), then (``run_stage``) resume-or-refuse from ``OUT/checkpoints``,
the run log, a log line every ``log_every`` steps and a checkpoint every ``save_every`` steps (and at the end), the
non-finite guard checked before anything is read or saved, and the final model in ``OUT/model``.

A stage supplies a ``Stage``: its model, optimizer, schedule and guard, its step, the metrics it logs and the data
position its checkpoints keep. The step must not read the device (no host sync); the metrics may, once per log line.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from rlvrw.guard import NonFiniteGuard
from rlvrw.train import checkpoints, distributed
from rlvrw.train.build import value_checks_off_on_gpu
from rlvrw.train.config import RunConfig
from rlvrw.train.logging import RunLogger

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"


def in_process_group(config: RunConfig, train: Callable[[RunConfig, distributed.DistributedContext], dict]) -> dict:
    """Check ``config``'s inputs, join torch.distributed (under torchrun; a single process otherwise) and return
    ``train(config, context)``; the process group is torn down after, unless the caller had set it up."""
    config.check_inputs()
    joined_here = not dist.is_initialized()
    context = distributed.setup(config.device)
    try:
        return train(config, context)
    finally:
        if joined_here:
            distributed.teardown()


@dataclass
class LogWindow:
    """The steps since the last log line: how many, the learning rate the last one used, and when the window began
    (``seconds()`` reads the clock: call it after reading the device, so that the time covers the device's work)."""

    steps: int = 0
    lr: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class Stage:
    """What a training stage gives ``run_stage``.

    ``step(step)`` runs optimizer step ``step`` (0-based) through ``guard``; ``metrics(done, window)`` returns the
    metrics logged after step ``done`` (1-based) for the steps of ``window``; ``data_state(done)`` the checkpoint's
    entries beside its config and skipped-step count (the data position to resume from). ``description`` is the
    first log line's middle, ``progress_keys`` the metrics on the progress bar, ``summary_keys`` the metrics the
    returned summary keeps.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: NonFiniteGuard
    step: Callable[[int], None]
    metrics: Callable[[int, LogWindow], dict]
    data_state: Callable[[int], dict]
    description: str
    progress_keys: tuple[str, ...]
    summary_keys: tuple[str, ...]


def run_stage(config: RunConfig, context: distributed.DistributedContext, stage: Stage) -> dict:
    """Run ``stage`` from its newest checkpoint (or from step 0; ``config.resume`` decides whether either may be
    refused) to ``config.stop_at_step`` or ``config.steps``. Returns the summary: {"step", *summary_keys,
    "checkpoint", "nonfinite_skipped"} and "model_dir" when the run reached its last step."""
    out_dir = Path(config.out_dir)
    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    start_step, found = checkpoints.start_or_resume(checkpoint_dir, out_dir, config, stage.model, stage.optimizer,
                                                   stage.scheduler, context.is_main)
    end_step = config.stop_at_step or config.steps
    guard = stage.guard
    guard.skipped = checkpoints.skipped_steps(found)

    run_log = RunLogger(out_dir, total_steps=end_step, start_step=start_step, tensorboard=config.tensorboard,
                        progress=config.progress, progress_keys=stage.progress_keys)
    run_log.message(f"{stage.name}: {stage.description}, steps {start_step} -> {end_step}"
                    + (f" (resumed from {found})" if found is not None else ""))
    summary = {"step": start_step, **dict.fromkeys(stage.summary_keys), "checkpoint": str(found) if found else None}
    window = LogWindow()
    # the run's data was range-checked once when it loaded: checking each step's tensors again would sync a GPU
    with contextlib.closing(run_log), value_checks_off_on_gpu(context.device):
        for step in range(start_step, end_step):
            window.lr = stage.scheduler.get_last_lr()[0]
            stage.step(step)
            window.steps += 1
            done = step + 1
            if done % config.log_every == 0 or done == end_step:
                guard.check()  # before the metrics are read: a stopped run logs no non-finite loss
                metrics = stage.metrics(done, window)
                run_log.log(done, metrics)
                summary.update(step=done, **{name: metrics[name] for name in stage.summary_keys})
                window = LogWindow()
            if done % config.save_every == 0 or done == end_step:
                state = {"config": config.to_dict(), **stage.data_state(done), "nonfinite_skipped": guard.check()}
                path = checkpoints.save_checkpoint(checkpoint_dir, done, stage.model, stage.optimizer, stage.scheduler,
                                                  state, keep_last=config.keep_checkpoints)
                summary["checkpoint"] = str(path)
            run_log.advance()
    summary["nonfinite_skipped"] = guard.check()
    if end_step == config.steps:
        summary["model_dir"] = str(checkpoints.save_model(out_dir / MODEL_DIR, stage.model))
    return summary
