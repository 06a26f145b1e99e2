"""Training checkpoints (rlvrw.train.checkpoints): a save/load round trip restores model, optimizer, scheduler and random
states exactly (the next step after loading equals the next step without saving), the directory loads as a Hugging
Face model, ``latest_checkpoint`` ignores half-written directories, ``keep_last`` prunes, atomic writes leave the old
file when the write fails, and bad arguments raise ValueError."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlvrw import files
from rlvrw.models import WorldModelConfig, WorldModelTransformer
from rlvrw.train import checkpoints as checkpoint
from rlvrw.usage import TrainingStopped, UsageError

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)


def make_run(seed: int = 0):
    """A tiny model, its AdamW and a warmup schedule."""
    torch.manual_seed(seed)
    model = WorldModelTransformer(WorldModelConfig(**TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> None:
    """Steps whose data come from the global torch RNG, so that restoring it matters."""
    for _ in range(steps):
        ids = torch.randint(0, TINY["vocab_size"], (2, 8))
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def assert_same_parameters(a, b):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_round_trip_continues_exactly(tmp_path):
    straight = make_run()
    train(*straight, steps=5)

    model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, steps=3)
    path = checkpoint.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, state={"position": 3})
    assert path == tmp_path / "step_00000003"

    torch.manual_seed(123)  # disturb every random state the checkpoint must restore
    np.random.seed(123)
    random.seed(123)
    resumed = make_run(seed=99)
    trainer_state = checkpoint.load_checkpoint(path, *resumed)
    assert trainer_state == {"step": 3, "world_size": 1, "state": {"position": 3}}
    assert resumed[2].last_epoch == 3
    train(*resumed, steps=2)
    assert_same_parameters(straight[0], resumed[0])


def test_random_states_round_trip(tmp_path):
    model = make_run()[0]
    path = checkpoint.save_checkpoint(tmp_path, 0, model)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    checkpoint.load_checkpoint(path, model)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_checkpoint_loads_as_hugging_face_directory(tmp_path):
    model, optimizer, scheduler = make_run()
    path = checkpoint.save_checkpoint(tmp_path, 7, model, optimizer, scheduler)
    loaded = WorldModelTransformer.from_pretrained(path)
    assert_same_parameters(model, loaded)
    model_dir = checkpoint.save_model(tmp_path / "model", model)
    assert_same_parameters(model, WorldModelTransformer.from_pretrained(model_dir))


def test_latest_checkpoint_skips_partial_directories_and_keep_last_prunes(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None
    model, optimizer, scheduler = make_run()
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, scheduler, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / ".tmp-step_00000009").mkdir()  # a save that died before its rename
    (tmp_path / "step_00000008").mkdir()  # no trainer_state.json: not a checkpoint
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000003"
    # saving a step again replaces it whole
    again = checkpoint.save_checkpoint(tmp_path, 3, model, state={"again": True})
    assert checkpoint.read_trainer_state(again)["state"] == {"again": True}
    assert not (again / checkpoint.OPTIMIZER_FILE).exists()


def test_errors(tmp_path):
    model, optimizer, scheduler = make_run()
    with pytest.raises(ValueError, match="step"):
        checkpoint.save_checkpoint(tmp_path, -1, model)
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint.save_checkpoint(tmp_path, 1, model, keep_last=0)
    with pytest.raises(ValueError, match="trainer_state.json"):
        checkpoint.load_checkpoint(tmp_path / "nowhere", model)
    path = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer)
    with pytest.raises(ValueError, match="scheduler"):
        checkpoint.load_checkpoint(path, model, optimizer, scheduler)
    other = WorldModelTransformer(WorldModelConfig(**{**TINY, "hidden_size": 64}))
    with pytest.raises(ValueError, match="model does not match"):
        checkpoint.load_checkpoint(path, other)


# ---- damaged files ---------------------------------------------------------------------------------------------------
def flip_bytes(path, count: int = 8) -> None:
    """A same-size corruption: ``count`` bytes in the middle of the file inverted."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(255 - b for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


DAMAGES = {
    "same-size": (flip_bytes, "corrupt (its sha256 differs"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:-16]), "truncated"),
    "zero-byte": (lambda path: path.write_bytes(b""), "empty (0 bytes)"),
    "missing": (lambda path: path.unlink(), "missing"),
}
FILES = (checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.CONFIG_FILE, "rng_rank0.pt")


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_named_and_nothing_is_loaded(tmp_path, name, damage):
    model, optimizer, scheduler = make_run()
    path = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    assert (path / files.MANIFEST_FILE).is_file()
    harm, words = DAMAGES[damage]
    harm(path / name)
    fresh = make_run(seed=5)
    before = [p.detach().clone() for p in fresh[0].parameters()]
    with pytest.raises(files.CorruptFileError) as caught:
        checkpoint.load_checkpoint(path, *fresh)
    message = str(caught.value)
    assert str(path / name) in message and words in message and "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, fresh[0].parameters()))  # nothing was loaded


def test_a_damaged_trainer_state_or_manifest_is_named(tmp_path):
    model = make_run()[0]
    path = checkpoint.save_checkpoint(tmp_path, 1, model)
    flip_bytes(path / checkpoint.TRAINER_STATE_FILE, 2)
    with pytest.raises(files.CorruptFileError, match="trainer_state.json"):
        checkpoint.load_checkpoint(path, model)
    path = checkpoint.save_checkpoint(tmp_path, 2, model)
    (path / files.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(files.CorruptFileError, match="manifest.json cannot be read"):
        checkpoint.load_checkpoint(path, model)


def test_a_checkpoint_from_before_manifests_loads_and_a_damaged_one_is_still_named(tmp_path, caplog):
    model, optimizer, scheduler = make_run()
    path = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    (path / files.MANIFEST_FILE).unlink()
    assert checkpoint.load_checkpoint(path, *make_run())["step"] == 1
    assert "not verified" in caplog.text
    (path / checkpoint.MODEL_FILE).write_bytes((path / checkpoint.MODEL_FILE).read_bytes()[:100])
    with pytest.raises(files.CorruptFileError, match=r"model\.safetensors: cannot be read"):
        checkpoint.load_checkpoint(path, *make_run())


class Settings:
    """What ``start_or_resume`` reads of a run's config."""

    def __init__(self, resume):
        self.resume = resume

    def to_dict(self):
        return {"resume": self.resume}


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    model, optimizer, scheduler = make_run()
    for step in (1, 2, 3):
        train(model, optimizer, scheduler, steps=1)
        checkpoint.save_checkpoint(tmp_path / "checkpoints", step, model, optimizer, scheduler)
    flip_bytes(tmp_path / "checkpoints" / "step_00000003" / checkpoint.MODEL_FILE)
    resumed = make_run(seed=1)
    start, found = checkpoint.start_or_resume(tmp_path / "checkpoints", tmp_path, Settings(None), *resumed, True)
    assert (start, found.name) == (2, "step_00000002")
    assert "step_00000003 is unusable" in caplog.text and "model.safetensors: corrupt" in caplog.text
    expected = make_run(seed=2)
    checkpoint.load_checkpoint(found, *expected)
    assert_same_parameters(expected[0], resumed[0])

    with pytest.raises(files.CorruptFileError, match=r"step_00000003/model\.safetensors: corrupt .*not resuming "
                                                     r"\(resume was asked for explicitly\)"):
        checkpoint.start_or_resume(tmp_path / "checkpoints", tmp_path, Settings(True), *make_run(), True)
    with pytest.raises(UsageError, match="earlier run"):
        checkpoint.start_or_resume(tmp_path / "checkpoints", tmp_path, Settings(False), *make_run(), True)
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_0000000{step}" / checkpoint.OPTIMIZER_FILE).write_bytes(b"")
    with pytest.raises(files.CorruptFileError, match="every checkpoint in .* is corrupt"):
        checkpoint.start_or_resume(tmp_path / "checkpoints", tmp_path, Settings(None), *make_run(), True)


def test_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file descriptors")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    model, optimizer, scheduler = make_run()
    final = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for name in FILES + (checkpoint.TRAINER_STATE_FILE,):
        assert f"{tmp}/{name}" in synced, name
    manifest = next(e for e in events[:rename] if e[0] == "replace" and e[2] == f"{tmp}/{files.MANIFEST_FILE}")
    assert manifest[1] in synced  # written whole (fsynced) beside its name, then renamed
    assert tmp in synced  # the directory's entries
    assert ("fsync", str(tmp_path)) in events[rename:]  # the rename itself


def test_a_published_model_is_verified_before_it_loads(tmp_path):
    model = make_run()[0]
    path = checkpoint.save_model(tmp_path / "model", model)
    assert_same_parameters(model, checkpoint.load_model(path, "init_from"))
    flip_bytes(path / checkpoint.MODEL_FILE)
    with pytest.raises(files.CorruptFileError, match=r"model/model\.safetensors: corrupt"):
        checkpoint.load_model(path, "init_from")
    (path / files.MANIFEST_FILE).unlink()  # as an older rlvrw wrote it: a truncated file is still named
    (path / checkpoint.MODEL_FILE).write_bytes(b"\x08")
    with pytest.raises(files.CorruptFileError, match=r"init_from: a file of .* cannot be read"):
        checkpoint.load_model(path, "init_from")
    with pytest.raises(UsageError, match=r"init_from: path must be a directory holding config\.json"):
        checkpoint.load_model(tmp_path / "nowhere", "init_from")


def test_a_non_finite_model_is_never_written(tmp_path):
    model, optimizer, scheduler = make_run()
    with torch.no_grad():
        model.lm_head.weight[1, 2] = float("inf")
    with pytest.raises(TrainingStopped, match=r"lm_head\.weight holds non-finite values"):
        checkpoint.save_model(tmp_path / "model", model)
    with pytest.raises(TrainingStopped, match=r"lm_head\.weight"):
        checkpoint.save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, scheduler)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob("checkpoints/*"))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_tokenizer_checkpoint_is_named(tmp_path, damage):
    from rlvrw.models.tokenizer_files import load_tokenizer, save_tokenizer
    from rlvrw.models.tokenizer import FrameTokenizer

    path = save_tokenizer(FrameTokenizer(channels=(8, 8), layers_per_block=1, latent_channels=8, levels=(4, 4),
                                         num_groups=4), tmp_path / "tok.safetensors")
    load_tokenizer(path)
    DAMAGES[damage][0](path)
    with pytest.raises(UsageError, match=r"tok\.safetensors"):  # CorruptFileError, or not found for a missing one
        load_tokenizer(path)


def test_pretrain_resumes_past_a_corrupt_checkpoint_bit_identically(tmp_path, capsys):
    """A same-size corruption of the newest model.safetensors (it used to load silently, train to NaN and publish
    a NaN model): the run says which file is bad and resumes from the checkpoint before it, ending exactly where an
    uninterrupted run ends; with --resume given explicitly it refuses instead, in one line."""
    import json

    from test_pretrain import final_weights, losses, tiny_config

    from rlvrw.train import pretrain as P

    straight = tiny_config(tmp_path, "straight", save_every=1)
    P.pretrain(straight)
    P.pretrain(tiny_config(tmp_path, "halves", save_every=1, stop_at_step=3))
    damaged = tmp_path / "halves" / "checkpoints" / "step_00000003" / checkpoint.MODEL_FILE
    flip_bytes(damaged)

    explicit = {**tiny_config(tmp_path, "halves", save_every=1).to_dict(), "resume": True}
    (tmp_path / "explicit.json").write_text(json.dumps(explicit))
    assert P.main(["--config", str(tmp_path / "explicit.json")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(damaged) in errors[0] and "resume was asked for explicitly" in errors[0]

    summary = P.pretrain(tiny_config(tmp_path, "halves", save_every=1))
    assert summary["step"] == 4
    expected, got = final_weights(straight), final_weights(tiny_config(tmp_path, "halves"))
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert losses(straight) == losses(tiny_config(tmp_path, "halves"))
