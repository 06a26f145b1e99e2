"""Data parallelism under torchrun: the process group, rank helpers, and wrapping a model in DDP or FSDP2.

    torchrun --nproc-per-node 8 -m rlvrw.train.pretrain --data tokens.npz --out runs/wm      # one node, 8 GPUs

``setup()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; ``MASTER_ADDR`` and
``MASTER_PORT`` are read by ``init_process_group``). With more than one process it joins the process group: NCCL when
the processes run on GPUs (each on the GPU of its local rank), gloo on CPU. Without torchrun there is one process and
no group, and every helper here answers as rank 0 of 1, so trainers have one code path.

``wrap_model`` offers two strategies. "ddp" (``DistributedDataParallel``): every rank holds the whole model and the
gradients are averaged over ranks during backward. "fsdp" (FSDP2, ``torch.distributed.fsdp.fully_shard``): parameters,
gradients and optimizer state are sharded over the ranks, each of the given units (the decoder layers) gathered just
for its own forward and backward; for models whose training state does not fit on one device. Both average
gradients over ranks: a loss normalized by the global token count and multiplied by the world size therefore gives
the gradient of the mean over the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment variables, or None outside torchrun."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in os.environ for name in names):
        return None
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in names)
    except ValueError as err:
        raise ValueError(f"torchrun environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers ({err})") from err
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"torchrun environment: inconsistent RANK={rank}, WORLD_SIZE={world_size}, "
                         f"LOCAL_RANK={local_rank}")
    return rank, world_size, local_rank


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU when CUDA is available, else the CPU; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch device string, got {device!r}") from err


def setup(device: str | torch.device = "auto", timeout_minutes: float = 30.0) -> DistributedContext:
    """Join torchrun's process group when there is one (NCCL on GPUs, gloo on CPU) and pick this process's device.

    ``timeout_minutes`` bounds how long a collective waits for the slowest rank (rank 0 may spend a while writing a
    checkpoint while the others wait at a barrier).
    """
    env = torchrun_environment()
    rank, world_size, local_rank = env if env is not None else (0, 1, 0)
    device = resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistributedContext(rank, world_size, local_rank, device)


def teardown() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it (unchanged in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------------------------------------------------
# Wrapping a model
# ----------------------------------------------------------------------------------------------------------------------


def wrap_model(
    module: nn.Module,
    context: DistributedContext,
    strategy: str = "ddp",
    shard_units: Iterable[nn.Module] = (),
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """``module`` (already on ``context.device``) made data-parallel over the process group, or as is in a single
    process.

    "ddp": ``DistributedDataParallel``; module buffers are not broadcast (they are constants here). "fsdp": FSDP2's
    ``fully_shard`` on each of ``shard_units`` (e.g. the decoder layers), then on ``module``; parameters become
    sharded DTensors, so build the optimizer after this call. ``param_dtype`` (FSDP only): the dtype parameters are
    gathered and computed in (bf16 halves the all-gathers); gradients are reduced in fp32 whatever it is.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if not context.distributed:
        return module
    if strategy == "ddp":
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(context.device.type, (context.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in shard_units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards modules in place: they are their own unwrapped module)."""
    return wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Within this context, backward passes average gradients over ranks only when ``enabled``: turn it off for all
    but the last micro-batch of a step, so that accumulation costs one gradient reduction per step.

    Run the backward pass inside the context too (DDP decides when the backward runs).
    """
    if enabled or not dist.is_initialized():
        yield
    elif isinstance(wrapped, nn.parallel.DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield
