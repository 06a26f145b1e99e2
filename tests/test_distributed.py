"""Data parallelism (rlvrw.train.distributed) and pre-training under torchrun on CPU with the gloo backend.

Two processes, each with one micro-batch, train on the same global batch as one process accumulating two
micro-batches: the losses and the parameters after the steps agree (DDP and FSDP2). The FSDP2 run is interrupted
and resumed, so that its sharded optimizer state and per-rank random states go through a checkpoint.
The single-process helpers and the torchrun environment parsing are tested too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlvrw.data import token_cache as TC
from rlvrw.train import distributed
from rlvrw.train import pretrain as P
from rlvrw.train.logging import read_metrics

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SETTINGS = dict(context_frames=2, steps=2, micro_batch_size=2, warmup_steps=1, log_every=1, save_every=100,
                model_overrides=TINY_MODEL, progress=False, tensorboard="off")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The reference: one process, two micro-batches of 2 per step (a global batch of 4)."""
    root = tmp_path_factory.mktemp("single")
    rng = np.random.default_rng(0)
    data = root / "tokens.npz"
    TC.save_token_cache(data, rng.integers(0, 64, (8, 10, 16)), rng.integers(0, 256, (8, 10, 3)), codebook_size=64)
    config = P.PretrainConfig(data=str(data), out_dir=str(root / "run"), grad_accum_steps=2, **SETTINGS)
    P.pretrain(config)
    return config


def torchrun(config_file, *extra_args) -> None:
    """``rlvrw pretrain`` in 2 CPU processes (gloo) under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "rlvrw.train.pretrain", "--config", str(config_file), *extra_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, single_process_run, strategy):
    reference = single_process_run
    out_dir = tmp_path / "run"
    settings = {**SETTINGS, "data": reference.data, "out_dir": str(out_dir), "grad_accum_steps": 1,
                "parallel": strategy}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(settings))
    if strategy == "fsdp":  # interrupted after step 1, then resumed: the sharded state goes through a checkpoint
        torchrun(config_file, "--stop-at-step", "1")
        assert sorted(p.name for p in (out_dir / "checkpoints" / "step_00000001").glob("rng_rank*.pt")) == [
            "rng_rank0.pt", "rng_rank1.pt"]
    torchrun(config_file)

    records = read_metrics(out_dir)
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes the log
    expected = [r["loss"] for r in read_metrics(reference.out_dir)]
    assert [r["loss"] for r in records] == pytest.approx(expected, rel=1e-6)
    got, want = load_file(out_dir / "model" / "model.safetensors"), load_file(
        f"{reference.out_dir}/model/model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


# ---- single process ------------------------------------------------------------------------------------------------
def test_single_process_helpers():
    context = distributed.setup("cpu")
    assert (context.rank, context.world_size, context.is_main, context.distributed) == (0, 1, True, False)
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main()) == (0, 1, True)
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(module, context, "fsdp") is module
    assert distributed.unwrap(module) is module
    tensor = torch.ones(2)
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 1.0]
    with distributed.gradient_sync(module, enabled=False):
        module(torch.ones(1, 2)).sum().backward()
    distributed.barrier()
    distributed.teardown()
    with pytest.raises(ValueError, match="strategy"):
        distributed.wrap_model(module, context, "zero3")


def test_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.torchrun_environment() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.torchrun_environment() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.torchrun_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="integers"):
        distributed.torchrun_environment()


def test_resolve_device():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert distributed.resolve_device("auto", local_rank=1) == expected
    with pytest.raises(ValueError, match="device"):
        distributed.resolve_device("tpu:zero")
