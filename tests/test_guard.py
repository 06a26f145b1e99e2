"""The training guard (rlvrw.guard): a non-finite loss or gradient norm never becomes an update, a checkpoint or a
published model.

* the guard itself, with a fused AdamW (the flag stays on the device: GradScaler's found_inf) and an unfused one (the
  flag is read at once): finite steps are bit-identical to unguarded ones; a bad step is skipped, parameters,
  moments and step counts untouched; "stop" raises naming the step and the term, "skip" counts;
* ``rlvrw pretrain`` from a starting model with a NaN weight stops at step 1 before saving anything (exit code 1,
  one line from the command), and in "skip" mode never publishes the NaN model; one poisoned step stops the run
  there, or is skipped and counted in the metrics and the summary;
* ``rlvrw rl``'s update, the tokenizer trainer, and the language trainers' updates (test_lang_train.py) likewise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlvrw.data import clips as CL
from rlvrw.data import token_cache as TC
from rlvrw.guard import NonFiniteGuard, check_finite_state
from rlvrw.models.transformer import WorldModelTransformer
from rlvrw.train import build as B
from rlvrw.train import pretrain as P
from rlvrw.train.logging import read_metrics
from rlvrw.usage import TrainingStopped, UsageError

NAN = float("nan")


def adamw(fused: bool, seed: int = 0):
    torch.manual_seed(seed)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    return params, torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=fused or None)


def set_grads(params, value=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) if value is None else torch.full(p.shape, value)


# ---- the guard -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_finite_steps_are_bit_identical_to_unguarded_ones(fused):
    plain, plain_opt = adamw(fused)
    guarded, guarded_opt = adamw(fused)
    guard = NonFiniteGuard("stop")
    for step in range(1, 4):
        set_grads(plain, seed=step)
        set_grads(guarded, seed=step)
        plain_opt.step()
        guard.step(guarded_opt, step, loss=torch.tensor(1.5), grad_norm=torch.tensor(2.0))
    assert guard.check() == 0
    for a, b in zip(plain, guarded):
        assert torch.equal(a, b)
    for a, b in zip(plain_opt.state.values(), guarded_opt.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("fused", [True, False])
def test_a_bad_step_is_skipped_whole_and_counted(fused):
    params, optimizer = adamw(fused)
    set_grads(params, seed=1)
    guard = NonFiniteGuard("skip", "demo")
    guard.step(optimizer, 1, loss=torch.tensor(1.0), grad_norm=torch.tensor(1.0))
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    set_grads(params, NAN)
    guard.step(optimizer, 2, loss=torch.tensor(NAN), grad_norm=torch.tensor(NAN))
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(state[k], optimizer.state[params[0]][k]) for k in state)  # moments, step count
    assert guard.check() == 1 and guard.skipped == 1
    set_grads(params, seed=3)
    guard.step(optimizer, 3, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")))
    assert guard.check() == 2
    assert all(torch.isfinite(p).all() for p in params)


def test_stop_names_the_first_bad_step_and_term_with_a_fused_optimizer():
    """The flag stays on the device until check(): the first bad step is the one reported, not the last."""
    params, optimizer = adamw(fused=True)
    guard = NonFiniteGuard("stop", "pretrain")
    start = [p.detach().clone() for p in params]
    for step, loss in ((1, 1.0), (2, NAN), (3, float("inf"))):
        set_grads(params, seed=step)
        guard.step(optimizer, step, loss=torch.tensor(loss), grad_norm=torch.tensor(1.0))
        if step == 1:
            after_step_1 = [p.detach().clone() for p in params]
    with pytest.raises(TrainingStopped, match=r"pretrain step 2: loss not finite \(loss=nan, grad_norm=1\); its "
                                              r"update was not applied"):
        guard.check()
    assert not any(torch.equal(a, b) for a, b in zip(start, after_step_1))  # step 1 was applied
    # steps 2 and 3 were not: their gradients were finite, their losses not
    assert all(torch.equal(a, b) for a, b in zip(after_step_1, params))


def test_stop_raises_at_the_bad_step_with_an_unfused_optimizer():
    params, optimizer = adamw(fused=False)
    set_grads(params)
    before = [p.detach().clone() for p in params]
    guard = NonFiniteGuard("stop", "rl")
    with pytest.raises(TrainingStopped, match=r"rl step 7: pg_loss, grad_norm not finite"):
        guard.step(optimizer, 7, loss=torch.tensor(0.5), pg_loss=torch.tensor(NAN), grad_norm=torch.tensor(NAN))
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_guard_arguments():
    with pytest.raises(UsageError, match="on_nonfinite must be one of"):
        NonFiniteGuard("ignore")
    with pytest.raises(ValueError, match="terms"):
        NonFiniteGuard().step(adamw(False)[1])


def test_check_finite_state_names_the_tensor():
    check_finite_state([("a", torch.ones(2)), ("ids", torch.tensor([1, 2]))], "model m")
    with pytest.raises(TrainingStopped, match=r"model m: b holds non-finite values \(1 tensor"):
        check_finite_state([("a", torch.ones(2)), ("b", torch.tensor([1.0, float("inf")]))], "model m")


# ---- rlvrw pretrain --------------------------------------------------------------------------------------------------
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_config(tmp_path, out="run", **overrides) -> P.PretrainConfig:
    data = tmp_path / "tokens.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        TC.save_token_cache(data, rng.integers(0, 64, (8, 12, 16)), rng.integers(0, 256, (8, 12, 3)),
                           codebook_size=64)
    settings = dict(data=str(data), out_dir=str(tmp_path / out), context_frames=2, steps=3, micro_batch_size=2,
                    grad_accum_steps=2, warmup_steps=1, log_every=1, save_every=1, model_overrides=TINY_MODEL,
                    progress=False, tensorboard="off")
    return P.PretrainConfig(**{**settings, **overrides})


@pytest.fixture
def nan_model(tmp_path):
    """A starting model with one NaN weight, written as any Hugging Face directory would be (no guard)."""
    cache = TC.load_token_cache(tiny_config(tmp_path).data)
    layout = CL.layout_for_cache(cache, 2, 64, 256)
    model = B.build_world_model(tiny_config(tmp_path), layout)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = NAN
    model.save_pretrained(tmp_path / "nan_model")
    return tmp_path / "nan_model"


def test_pretrain_stops_before_the_first_update_and_saves_nothing(tmp_path, nan_model):
    config = tiny_config(tmp_path, init_from=str(nan_model))
    with pytest.raises(TrainingStopped, match=r"pretrain step 1: loss, grad_norm not finite"):
        P.pretrain(config)
    assert not list((tmp_path / "run").glob("checkpoints/step_*")) and not (tmp_path / "run" / "model").exists()
    assert read_metrics(tmp_path / "run") == []  # no NaN loss logged either


def test_pretrain_command_exits_1_with_one_line(tmp_path, nan_model, capsys):
    tiny_config(tmp_path)  # the token cache
    code = P.main(["--data", str(tmp_path / "tokens.npz"), "--init-from", str(nan_model), "--out",
                   str(tmp_path / "cli"), "--context-frames", "2", "--steps", "2", "--micro-batch-size", "2",
                   "--no-progress", "--tensorboard", "off"])
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("rlvrw pretrain: error: pretrain step 1: loss, grad_norm not finite")


def test_skipping_never_publishes_a_non_finite_model(tmp_path, nan_model):
    """Every step is skipped (the starting model is NaN): the run refuses to write it."""
    config = tiny_config(tmp_path, init_from=str(nan_model), on_nonfinite="skip")
    with pytest.raises(TrainingStopped, match=r"model\.layers\.0\.mlp\.down_proj\.weight holds non-finite values"):
        P.pretrain(config)
    assert not list((tmp_path / "run").glob("checkpoints/step_*")) and not (tmp_path / "run" / "model").exists()


@pytest.fixture
def poisoned_step_2(monkeypatch):
    """The loss of step 2's first micro-batch (forward call 3 of 2 per step) is NaN."""
    forward = P.NextTokenLoss.forward
    calls = []

    def poisoned(self, ids):
        calls.append(1)
        nll = forward(self, ids)
        return nll * NAN if len(calls) == 3 else nll

    monkeypatch.setattr(P.NextTokenLoss, "forward", poisoned)


def test_one_bad_step_stops_the_run_there(tmp_path, poisoned_step_2):
    with pytest.raises(TrainingStopped, match=r"pretrain step 2: loss, grad_norm not finite"):
        P.pretrain(tiny_config(tmp_path))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000001"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]


def test_one_bad_step_is_skipped_and_counted(tmp_path, poisoned_step_2):
    summary = P.pretrain(tiny_config(tmp_path, on_nonfinite="skip"))
    assert summary["step"] == 3 and summary["nonfinite_skipped"] == 1 and np.isfinite(summary["loss"])
    assert [r["nonfinite_skipped"] for r in read_metrics(tmp_path / "run")] == [0, 1, 1]
    model = WorldModelTransformer.from_pretrained(tmp_path / "run" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_step_with_a_guard_equals_train_step_without(tmp_path):
    config = tiny_config(tmp_path)
    cache = TC.load_token_cache(config.data)
    layout = CL.layout_for_cache(cache, 2, 64, 256)
    sampler = CL.ClipSampler(cache, layout)
    results = []
    for guard in (None, NonFiniteGuard()):
        torch.manual_seed(0)
        model = B.build_world_model(config, layout)
        loss = P.NextTokenLoss(model, layout)
        optimizer = B.make_optimizer(model, config, fused=True)
        scheduler = B.make_scheduler(optimizer, config)
        for step in range(2):
            batches = [sampler.sequences(step, 4, slice(0, 2)), sampler.sequences(step, 4, slice(2, 4))]
            P.train_step(loss, optimizer, scheduler, batches, 4 * 16, 1.0, None, 1, guard, step + 1)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---- rlvrw rl --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_rl_update_with_a_nan_advantage(on_nonfinite):
    import rlvrw.ops as ops
    from test_rl_trainer import LAYOUT, make_trainer, true_sequences

    trainer = make_trainer(on_nonfinite=on_nonfinite)
    rollout = trainer.sampler.sample(*LAYOUT.split(true_sequences(2)), seed=1)
    advantages = ops.group_advantages(torch.randn(8), 4)
    advantages[3] = NAN
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    if on_nonfinite == "stop":
        with pytest.raises(TrainingStopped, match=r"rl step 5: loss, pg_loss.*not finite"):
            trainer.update(rollout, advantages, step=5)
    else:
        trainer.update(rollout, advantages, step=5)
        assert trainer.guard.check() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


# ---- the tokenizer trainer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_tokenizer_training_with_a_nan_perceptual_loss(tmp_path, on_nonfinite):
    from rlvrw.models.tokenizer_files import save_tokenizer
    from rlvrw.models.tokenizer import FrameTokenizer
    from rlvrw.models.tokenizer_train import TrainConfig, train_tokenizer

    torch.manual_seed(0)
    model = FrameTokenizer(channels=(8, 8), layers_per_block=1, latent_channels=8, levels=(4, 4), num_groups=4)
    start = [p.detach().clone() for p in model.parameters()]
    frames = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=0, log_every=1, on_nonfinite=on_nonfinite)

    def perceptual(pred, target):
        return (pred - target).abs().mean() * NAN

    if on_nonfinite == "stop":
        with pytest.raises(TrainingStopped, match=r"tokenizer step 1: loss, grad_norm, perceptual not finite"):
            train_tokenizer(model, frames, config, perceptual, log=None)
    else:
        history = train_tokenizer(model, frames, config, perceptual, log=None)
        assert [entry["nonfinite_skipped"] for entry in history] == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    with torch.no_grad():
        next(model.parameters())[0] = NAN
    with pytest.raises(TrainingStopped, match="never saved"):
        save_tokenizer(model, tmp_path / "tok.safetensors")
    assert not (tmp_path / "tok.safetensors").exists()


# ---- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_the_fused_path_never_syncs_and_skips_on_the_device():
    device = torch.device("cuda")
    torch.manual_seed(0)
    params = [torch.randn(64, 32, device=device, requires_grad=True)]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    guard = NonFiniteGuard("skip", "rl")
    params[0].grad = torch.randn_like(params[0])
    guard.step(optimizer, 1, loss=torch.ones((), device=device), grad_norm=torch.ones((), device=device))  # warm up
    torch.cuda.synchronize()
    before = params[0].detach().clone()
    params[0].grad = torch.full_like(params[0], NAN)
    torch.cuda.set_sync_debug_mode("error")
    try:
        guard.step(optimizer, 2, loss=torch.full((), NAN, device=device), grad_norm=torch.ones((), device=device))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(before, params[0]) and guard.check() == 1
