"""Training checkpoints that resume exactly, shared by pre-training and the RL trainer.

A checkpoint is a directory ``<checkpoint_dir>/step_<step, 8 digits>/`` holding

    model.safetensors     the model's full state dict, as trained (fp32 master weights), in safetensors
    config.json           when the model has a Hugging Face config (``WorldModelTransformer``): the directory then
                          loads as is with ``WorldModelTransformer.from_pretrained``
    optimizer.pt          ``torch.save`` of {"optimizer": ..., "scheduler": ...}; optimizer state keyed by parameter
                          name (not by position), so it loads whatever the data-parallel wrapping
    rng_rank<r>.pt        ``torch.save`` of rank r's random states: torch CPU and CUDA, numpy, Python
    trainer_state.json    {"step", "world_size", "state"}: ``state`` is the trainer's own JSON-able dict (where the
                          data stream stands, tokens seen, its config)
    manifest.json         the size and sha256 of every other file (``rlvrw.files.seal_directory``)

Everything is written into ``.tmp-step_<step>`` beside the final name, fsynced, listed in the manifest, and renamed
into place last, so a run killed while saving leaves no directory that ``latest_checkpoint`` would pick.
``load_checkpoint`` checks every file against the manifest before it loads anything, and names the file that is
missing, truncated, empty or changed (``rlvrw.files.CorruptFileError``). ``start_or_resume`` then falls back to the
newest intact checkpoint, saying which file was bad, unless the run asked for ``resume`` explicitly: that refuses.
A model (``save_model`` and the checkpoints' model) with a non-finite parameter is never written.

Under torch.distributed every rank calls ``save_checkpoint`` and ``load_checkpoint`` (gathering FSDP2 shards is
collective); rank 0 writes the shared files, each rank its own random state, so all ranks need the same file system.

    path = save_checkpoint(run_dir / "checkpoints", step, model, optimizer, scheduler, state={"tokens": n})
    found = latest_checkpoint(run_dir / "checkpoints")          # None on a fresh run
    if found: trainer_state = load_checkpoint(found, model, optimizer, scheduler)   # {"step", "world_size", "state"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rlvrw import checks, files
from rlvrw.files import CorruptFileError
from rlvrw.guard import check_finite_state
from rlvrw.train import distributed
from rlvrw.train.config import config_differences
from rlvrw.usage import UsageError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
RESUME_HELP = ("continue from the newest intact checkpoint in OUT/checkpoints (default: when there is one, skipping "
               "corrupt ones); --resume: the newest, refusing a corrupt one; --no-resume: refuse to run where "
               "checkpoints exist")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_model(path: str | Path, model: nn.Module) -> Path:
    """Write a model-only directory (``model.safetensors`` and, when the model has one, ``config.json``)
    atomically; every rank calls it under torch.distributed, rank 0 writes. A ``WorldModelTransformer`` written here
    loads with ``WorldModelTransformer.from_pretrained``."""
    final = Path(path)
    check_finite_state(distributed.unwrap(model).named_parameters(), f"model {final}")
    state = full_model_state(model)
    if distributed.is_main():
        files.write_directory(final, lambda tmp: _write_model_files(tmp, model, state))
    distributed.barrier()
    return final


def load_model(path: str | Path, what: str, **kwargs) -> nn.Module:
    """``WorldModelTransformer.from_pretrained(path, **kwargs)`` of a model directory (``save_model``'s, a
    checkpoint's, any Hugging Face LlamaForCausalLM one), its files first checked against its manifest when it has
    one: a missing, truncated, empty, changed or unreadable file is a ``CorruptFileError`` naming it, and a directory
    that does not hold a model a ``UsageError`` naming ``what`` (the setting that named it)."""
    from safetensors import SafetensorError

    from rlvrw.models.transformer import WorldModelTransformer

    path = Path(path)
    files.verify_directory(path)
    try:
        return WorldModelTransformer.from_pretrained(path, **kwargs)
    except (OSError, EOFError, SafetensorError, pickle.UnpicklingError) as err:
        raise CorruptFileError(f"{what}: a file of {path} cannot be read ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]})") from err
    except ValueError as err:  # from_pretrained's checks: no config.json, names or shapes that do not match
        raise UsageError(f"{what}: {' '.join(str(err).split())}") from err


# ----------------------------------------------------------------------------------------------------------------------
# State dicts (plain, DDP and FSDP2 modules alike)
# ----------------------------------------------------------------------------------------------------------------------

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU, names without wrapper prefixes. Collective under FSDP2 (every rank calls;
    rank 0 gets the tensors, other ranks an empty dict)."""
    return get_model_state_dict(distributed.unwrap(model), options=FULL_ON_CPU)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name, on the CPU (collective under FSDP2, like
    ``full_model_state``)."""
    return get_optimizer_state_dict(distributed.unwrap(model), optimizer, options=FULL_ON_CPU)


def _write_model_files(directory: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    save_file(tensors, str(directory / MODEL_FILE), metadata={"format": "pt"})
    config = getattr(distributed.unwrap(model), "config", None)
    if hasattr(config, "to_hf_dict"):
        (directory / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Random states
# ----------------------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's random states (torch CPU and every CUDA device, numpy's global generator, Python's), in a form
    that ``torch.load(..., weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gauss": cached_gauss},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gauss"]))
    random.setstate(state["python"])


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    state: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write the checkpoint of ``step`` (see the module doc) and return its directory.

    ``model`` may be plain, DDP-wrapped or FSDP2-sharded; ``scheduler`` anything with ``state_dict()``; ``state`` a
    JSON-able dict of the trainer's own (its data position). ``keep_last``: afterwards, delete all but the newest
    ``keep_last`` checkpoints (None keeps all). Every rank must call this.
    """
    checks.integer("step", step, low=0)
    if keep_last is not None:
        checks.integer("keep_last", keep_last)
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / step_dir_name(step)
    tmp = checkpoint_dir / f".tmp-{final.name}"  # one name that every rank knows without talking
    check_finite_state(distributed.unwrap(model).named_parameters(), f"checkpoint {final}")
    model_state = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer) if optimizer is not None else None
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a run that died while saving
        tmp.mkdir(parents=True)
    distributed.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{distributed.get_rank()}.pt")
    if distributed.is_main():
        _write_model_files(tmp, model, model_state)
        if optimizer is not None:
            scheduler_state = scheduler.state_dict() if scheduler is not None else None
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state}, tmp / OPTIMIZER_FILE)
        trainer_state = {"step": step, "world_size": distributed.get_world_size(), "state": state or {}}
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    distributed.barrier()
    if distributed.is_main():
        files.publish_directory(tmp, final)
        if keep_last is not None:
            for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``checkpoint_dir``, oldest first (temporary directories are not listed)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir``, or None when there is none (or no such directory)."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def read_trainer_state(path: str | Path) -> dict:
    """A checkpoint's ``trainer_state.json``: {"step", "world_size", "state"}."""
    file = Path(path) / TRAINER_STATE_FILE
    if not file.is_file():
        raise ValueError(f"path must be a checkpoint directory holding {TRAINER_STATE_FILE}, got {str(path)!r}")
    with _reading(file):
        state = json.loads(file.read_text())
        if not isinstance(state, dict) or not {"step", "world_size", "state"} <= set(state):
            raise ValueError("not a trainer state")
    return state


def skipped_steps(path: str | Path | None) -> int:
    """The count of non-finite steps skipped (``rlvrw.guard``) up to checkpoint ``path`` (0 for None)."""
    return int(read_trainer_state(path)["state"].get("nonfinite_skipped", 0)) if path is not None else 0


def start_or_resume(checkpoint_dir: str | Path, out_dir: str | Path, config, model: nn.Module, optimizer, scheduler,
                    is_main: bool) -> tuple[int, Path | None]:
    """The step a run starts from, and the checkpoint it resumed (or None): 0 for a fresh run, else the step of the
    newest intact checkpoint after loading it into ``model``, ``optimizer`` and ``scheduler``.

    ``config.resume``: None (the default) resumes the newest intact checkpoint, logging each newer one that is
    corrupt and which of its files is bad; True resumes the newest and refuses (``CorruptFileError``) when it is
    corrupt; False refuses a directory that already holds checkpoints. When every checkpoint is corrupt the run
    refuses too, rather than start afresh over them. Rank 0 writes ``out_dir/config.json``."""
    start_step, found, problems = 0, None, []
    candidates = list_checkpoints(checkpoint_dir)
    if candidates and config.resume is False:
        raise UsageError(f"out_dir {str(out_dir)!r} holds checkpoints of an earlier run (newest: "
                         f"{candidates[-1].name}): resume it (resume=True) or choose another out_dir")
    for candidate in reversed(candidates):
        try:
            trainer_state = load_checkpoint(candidate, model, optimizer, scheduler)
        except CorruptFileError as err:
            if config.resume:
                raise CorruptFileError(f"{err}; not resuming (resume was asked for explicitly): move {candidate} "
                                       "away to resume from the checkpoint before it") from err
            if is_main:
                logger.warning("checkpoint %s is unusable, trying the one before it: %s", candidate.name, err)
            problems.append(str(err))
            continue
        found, start_step = candidate, trainer_state["step"]
        changed = config_differences(trainer_state["state"].get("config", {}), config)
        if changed and is_main:
            logger.warning("resuming %s with changed settings %s: the run will not match an uninterrupted one",
                           found, changed)
        break
    if candidates and found is None:
        raise CorruptFileError(f"every checkpoint in {checkpoint_dir} is corrupt (newest: {problems[0]}); move them "
                               "away to start afresh")
    if is_main:
        files.write_json(Path(out_dir) / "config.json", config.to_dict())
    return start_step, found


@contextlib.contextmanager
def _reading(file: Path):
    """Any failure to read or decode ``file`` (truncated, empty, garbled) as a CorruptFileError naming it."""
    try:
        yield
    except CorruptFileError:
        raise
    except Exception as err:  # safetensors, torch.load and json each fail in their own way on a damaged file
        raise CorruptFileError(f"{file}: cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})") \
            from err


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
) -> dict:
    """Load the checkpoint directory ``path`` into ``model`` (and ``optimizer``, ``scheduler``, this rank's random
    states) and return its trainer state {"step", "world_size", "state"}. Every rank must call this.

    The model must have the checkpoint's parameters and shapes (strict). A rank whose random state is missing (the
    run was saved with fewer ranks) keeps its own and logs a warning: the run goes on, but not bit for bit. Every
    file is checked against the checkpoint's manifest first, and a file that is missing, truncated, empty, changed
    or unreadable raises ``CorruptFileError`` naming it, before anything is loaded from it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / TRAINER_STATE_FILE).is_file():
        read_trainer_state(path)  # its error: not a checkpoint directory
    if not files.verify_directory(path):
        logger.warning("checkpoint %s has no %s (written by an older rlvrw): its files are not verified", path,
                       files.MANIFEST_FILE)
    trainer_state = read_trainer_state(path)
    model_file = path / MODEL_FILE
    if not model_file.is_file():
        raise CorruptFileError(f"path {str(path)!r} holds no {MODEL_FILE}")
    with _reading(model_file):
        tensors = load_file(str(model_file))
    try:
        set_model_state_dict(distributed.unwrap(model), tensors,
                             options=StateDictOptions(full_state_dict=True, strict=True))
    except RuntimeError as err:  # load_state_dict's report of missing, unexpected or misshapen tensors
        raise UsageError(f"model does not match checkpoint {path}: {err}") from err
    if optimizer is not None:
        if not (path / OPTIMIZER_FILE).is_file():
            raise ValueError(f"checkpoint {path} has no optimizer state ({OPTIMIZER_FILE}); pass optimizer=None")
        with _reading(path / OPTIMIZER_FILE):
            saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        if scheduler is not None and saved["scheduler"] is None:
            raise ValueError(f"checkpoint {path} has no scheduler state")
        set_optimizer_state_dict(distributed.unwrap(model), optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    if restore_rng:
        rng_file = path / f"rng_rank{distributed.get_rank()}.pt"
        if rng_file.is_file():
            with _reading(rng_file):
                rng = torch.load(rng_file, map_location="cpu", weights_only=True)
            set_rng_state(rng)
        else:
            logger.warning("checkpoint %s has no random state for rank %d (saved with %d ranks): keeping this "
                           "process's own", path, distributed.get_rank(), trainer_state["world_size"])
    return trainer_state
