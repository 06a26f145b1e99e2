"""The training guard: no non-finite update is applied, saved or published.

Every trainer (``rlvrw pretrain``, ``rlvrw rl``, the tokenizer's and the language models') takes its optimizer step
through ``NonFiniteGuard.step(optimizer, step, loss=..., grad_norm=...)``: the update is applied only when every
term given (the loss, its parts, the gradient norm) is finite. A step with a non-finite term is handled as the run's
``on_nonfinite`` setting says:

- ``"stop"`` (the default): the run stops with ``TrainingStopped``, naming the step and the terms, before that
  step's update is applied and before anything is saved;
- ``"skip"``: the update is skipped (the optimizer's state too) and counted (``NonFiniteGuard.skipped``, logged);
  the run goes on.

No host sync on the hot path. With a fused Adam/AdamW (on a GPU, the trainers' choice), the skip is decided on the
device, as ``torch.amp.GradScaler`` does it: the optimizer gets a ``found_inf`` flag, and its fused kernel leaves
parameters, moments and step counts untouched when the flag is 1 (with the flag 0 it runs exactly the unguarded
arithmetic). The first bad step, its terms and the count are kept on the device too, and ``check()`` reads them: the
trainers call it where they read their metrics anyway (the log cadence) and before every save, so in ``"stop"`` mode
the run ends there, never having applied or saved the bad update. With any other optimizer the flag is read on the
host at once (free on the CPU; one sync per step on a GPU, e.g. FSDP2's unfused AdamW) and ``"stop"`` raises at the
bad step itself. Under torch.distributed the flag is OR-ed over ranks (an all-reduce on the device, no sync), so
every rank skips or applies the same steps.

``check_finite_state(tensors, what)`` is the last line: writers of checkpoints and models call it, and a non-finite
tensor is never written.

The guard draws no random numbers and changes no arithmetic on finite inputs: a run that never meets a non-finite
term gives bit-identical results with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from rlvrw import checks
from rlvrw.usage import TrainingStopped, UsageError

logger = logging.getLogger(__name__)

ON_NONFINITE = ("stop", "skip")
ON_NONFINITE_HELP = ("a non-finite loss or gradient norm: stop the run (before that step's update and before "
                     "anything is saved) or skip that step's update and count it")


def check_on_nonfinite(value) -> str:
    return checks.choice("on_nonfinite", value, ON_NONFINITE, error=UsageError)


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a device ``found_inf`` flag (fused Adam and AdamW, GradScaler's
    protocol)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) \
        and all(group.get("fused") for group in optimizer.param_groups)


class NonFiniteGuard:
    """Applies optimizer steps whose terms are all finite; see the module doc. ``what`` names the run in messages."""

    def __init__(self, on_nonfinite: str = "stop", what: str = "training", skipped: int = 0):
        self.mode = check_on_nonfinite(on_nonfinite)
        self.what = what
        self.skipped = skipped  # steps skipped so far, as far as the host knows (``check`` brings it up to date)
        self._calls = 0
        self._pending: dict[tuple[str, ...], list[torch.Tensor]] = {}  # per term names: count, first step, values

    def step(self, optimizer: torch.optim.Optimizer, step: int | None = None, **terms: torch.Tensor) -> None:
        """``optimizer.step()`` when every term (0-d tensors or numbers) is finite; else skip it, or stop (see the
        module doc). ``step`` numbers the step in messages (default: this guard's count of calls)."""
        if not terms:
            raise ValueError("terms must name at least one value to check (the loss, the gradient norm)")
        self._calls += 1
        step = self._calls if step is None else step
        names = tuple(terms)
        values = torch.stack([torch.as_tensor(value).detach().float().reshape(()) for value in terms.values()])
        bad = ~torch.isfinite(values).all()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = bad.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank applies or skips the same steps
            bad = flag.bool()
        if _fused(optimizer):
            optimizer.found_inf = bad.float()
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            self._record(names, step, values, bad)
            return
        if bool(bad):  # the flag on the host: free on the CPU, a sync on a GPU
            self._record(names, step, values, bad)
            self.check()
            # a step without gradients leaves every parameter and its state as it is (and keeps the learning-rate
            # scheduler's bookkeeping of optimizer steps in order)
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()

    def _record(self, names: tuple[str, ...], step: int, values: torch.Tensor, bad: torch.Tensor) -> None:
        if names not in self._pending:
            self._pending[names] = [torch.zeros((), dtype=torch.int64, device=values.device),
                                    torch.full((), -1, dtype=torch.int64, device=values.device), values.clone()]
        count, first_step, first_values = self._pending[names]
        first = bad & (first_step < 0)
        self._pending[names] = [count + bad.to(torch.int64), torch.where(first, step, first_step),
                                torch.where(first, values, first_values)]

    def check(self) -> int:
        """Read what the device recorded since the last check (a sync when there is anything pending). In "stop"
        mode a non-finite step raises ``TrainingStopped``; in "skip" mode it is counted and logged. Returns the
        count of skipped steps."""
        pending, self._pending = self._pending, {}
        for names, (count, first_step, values) in pending.items():
            count = int(count)
            if not count:
                continue
            terms = ", ".join(f"{name}={value:g}" for name, value in zip(names, values.tolist()))
            bad = [name for name, value in zip(names, values.tolist()) if not math.isfinite(value)]
            where = f"{self.what} step {int(first_step)}: {', '.join(bad)} not finite ({terms})"
            if self.mode == "stop":
                raise TrainingStopped(f"{where}; its update was not applied and the run stopped before saving "
                                      "anything. Lower the learning rate or check the data and the starting model; "
                                      "on_nonfinite=skip (--on-nonfinite skip) skips such steps and counts them")
            self.skipped += count
            logger.warning("%s; update skipped (%d non-finite step(s) skipped so far)", where, self.skipped)
        return self.skipped


def check_finite_state(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """``TrainingStopped`` naming the first floating-point tensor of ``(name, tensor)`` pairs that holds a NaN or an
    infinity: a model with one is never written. Sharded tensors (DTensor) are checked shard by shard, and under
    torch.distributed every rank calls this and all of them raise together (one all-reduce and one sync)."""
    named = [(name, tensor.to_local() if hasattr(tensor, "to_local") else tensor) for name, tensor in tensors]
    named = [(name, tensor.detach()) for name, tensor in named
             if torch.is_tensor(tensor) and tensor.is_floating_point()]
    if not named:
        return
    device = named[0][1].device
    flags = torch.stack([~torch.isfinite(tensor).all().to(device) for _, tensor in named]).to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad = flags.nonzero().flatten().tolist()
    if bad:
        raise TrainingStopped(f"{what}: {named[bad[0]][0]} holds non-finite values ({len(bad)} tensor(s) do); a "
                              "non-finite model is never saved")
