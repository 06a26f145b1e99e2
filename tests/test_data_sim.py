"""The simulator data: PushT with the scripted pusher and Meta-World with its expert policies, written as episodes
that the reader loads; deterministic given the seed, whatever the number of worker processes."""

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch

from rlvrw.data import rt1, sim


def needs(module: str, package: str):
    """Skip unless ``module`` is installed. Found, not imported: a MuJoCo imported with OSMesa links Mesa's LLVM into
    this process, and a later ``import triton`` by another test would crash it."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{package} is not installed (pip install {package}, or rlvrw[sim])")


needs_pusht = needs("gym_pusht", "gym-pusht")
needs_metaworld = needs("metaworld", "metaworld")


def block_moved(path, tolerance=2.0):
    with np.load(path) as npz:
        pose = npz["block_pose"]
    shift = np.linalg.norm(pose[-1, :2] - pose[0, :2])
    turn = abs(sim._wrap_angle(pose[-1, 2] - pose[0, 2]))
    return shift > tolerance or turn > 0.05


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@needs_pusht
def test_pusht_episodes_push_the_block(tmp_path):
    out = sim.generate("pusht", tmp_path, episodes=8, frames_per_episode=24, size=64, seed=1, progress=False)
    paths = rt1.list_episodes(out)
    assert len(paths) == 8
    episode = rt1.load_episode(paths[0])
    assert episode.image.shape == (24, 64, 64, 3) and episode.action.shape == (24, 2)
    assert episode.action.min() >= 0 and episode.action.max() <= 512
    assert np.abs(np.diff(episode.image.astype(np.int16), axis=0)).sum() > 0, "the frames change"
    moved = sum(block_moved(p) for p in paths)
    assert moved >= 6, f"the block moved in only {moved} of 8 episodes"
    manifest = sim.read_manifest(out)
    assert manifest["complete"] and manifest["action_dims"] == 2 and manifest["config"]["size"] == [64, 64]
    stats = json.loads((out / rt1.STATS_FILE).read_text())
    assert stats["num_episodes"] == 7  # the training split: all but the first episode

    clips = rt1.EpisodeClips(out, split="train", clip_frames=rt1.SINGLE_STEP_FRAMES)
    batch = next(iter(torch.utils.data.DataLoader(clips, batch_size=4)))
    assert batch["frames"].shape == (4, 5, 3, 64, 64) and batch["action_ids"].shape == (4, 5, 2)
    assert 0 <= batch["action_ids"].min() and batch["action_ids"].max() <= 255


@needs_pusht
def test_pusht_action_repeat_holds_each_target_for_more_steps(tmp_path):
    """The default holds each target for 3 steps, so that consecutive frames differ more than at one step each."""
    settings = {"episodes": 3, "frames_per_episode": 12, "size": 32, "seed": 4, "progress": False}
    default = sim.generate("pusht", tmp_path / "default", **settings)
    single = sim.generate("pusht", tmp_path / "single", action_repeat=1, **settings)
    assert sim.read_manifest(default)["config"]["action_repeat"] == sim.DEFAULT_ACTION_REPEAT["pusht"] == 3
    assert sim.dataset_name(sim.make_config("pusht", 3, 12, 32, 4)).endswith("-repeat3-seed4")

    def frame_change(out):
        images = [rt1.load_episode(path).image.astype(np.int16) for path in rt1.list_episodes(out)]
        return np.mean([np.abs(np.diff(image, axis=0)).mean() for image in images])

    assert frame_change(default) > 1.5 * frame_change(single)


@needs_pusht
def test_pusht_same_seed_same_bytes_with_any_number_of_workers(tmp_path):
    settings = {"episodes": 3, "frames_per_episode": 6, "size": 32, "progress": False}
    one = sim.generate("pusht", tmp_path / "one", seed=5, workers=1, **settings)
    two = sim.generate("pusht", tmp_path / "two", seed=5, workers=2, **settings)
    other = sim.generate("pusht", tmp_path / "other", seed=6, workers=1, **settings)
    assert files(one) == files(two)
    assert files(one)["episode_000000.npz"] != files(other)["episode_000000.npz"]


@needs_pusht
def test_generation_resumes_and_guards_its_directory(tmp_path):
    settings = {"episodes": 3, "frames_per_episode": 4, "size": 32, "seed": 2, "progress": False}
    out = sim.generate("pusht", tmp_path / "data", **settings)
    before = files(out)
    (out / "episode_000001.npz").unlink()
    manifest = json.loads((out / sim.MANIFEST_FILE).read_text())
    manifest["complete"] = False
    (out / sim.MANIFEST_FILE).write_text(json.dumps(manifest))
    sim.generate("pusht", out, **settings)
    assert files(out) == before, "an interrupted run completes to the same bytes"
    with pytest.raises(ValueError, match="other settings"):
        sim.generate("pusht", out, **{**settings, "seed": 3})
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "episode_000000.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="no generation.json"):
        sim.generate("pusht", stray, **settings)


def test_bad_settings_name_the_argument():
    for kwargs, name in [({"sim": "mujoco"}, "sim"), ({"episodes": 1}, "episodes"), ({"size": 4}, "size"),
                         ({"frames_per_episode": 2.5}, "frames_per_episode"), ({"seed": -1}, "seed"),
                         ({"workers": 0}, "workers"), ({"sim": "pusht", "tasks": ["push-v3"]}, "tasks"),
                         ({"sim": "metaworld", "tasks": "push-v3"}, "tasks")]:
        with pytest.raises(ValueError, match=name):
            sim.generate(**{"out_dir": "/nonexistent/never-written", "progress": False, **kwargs})


@needs_metaworld
def test_metaworld_expert_episodes(tmp_path):
    settings = {"episodes": 2, "frames_per_episode": 10, "size": (48, 64), "seed": 0,
                "tasks": ("push-v3", "reach-v3"), "progress": False}
    try:
        out = sim.generate("metaworld", tmp_path / "a", **settings)
    except RuntimeError as err:
        if "cannot render headless" in str(err):
            pytest.skip(str(err))
        raise
    paths = rt1.list_episodes(out)
    for path, task in zip(paths, ("push-v3", "reach-v3"), strict=True):
        with np.load(path) as npz:
            image, action = npz["image"], npz["action"]
            assert str(npz["task"]) == task
        assert image.shape == (10, 48, 64, 3) and action.shape == (10, 4)
        assert action.min() >= -1 and action.max() <= 1
        assert np.abs(image[-1].astype(np.int16) - image[0]).mean() > 1, "the arm moves"
    assert files(sim.generate("metaworld", tmp_path / "b", **settings)) == files(out)
    clips = rt1.EpisodeClips(out, split="all", clip_frames=4)
    assert clips[1]["action_ids"].shape == (4, 4)
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        sim.generate("metaworld", tmp_path / "c", **{**settings, "tasks": ("fly-v3",)})


@needs_pusht
def test_default_dataset_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVRW_CACHE", str(tmp_path))
    monkeypatch.setitem(sim.DEFAULT_DATASET, "episodes", 2)
    monkeypatch.setitem(sim.DEFAULT_DATASET, "frames_per_episode", 3)
    out = sim.default_dataset(progress=False)
    assert out.parent == tmp_path / "sim" and len(rt1.list_episodes(out)) == 2
    written = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sim.default_dataset(progress=False) == out
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == written, "a complete data set is not rewritten"


@needs_pusht
def test_command_generates_and_checks(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rlvrw")
    sim.add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "data"
    args = parser.parse_args(["data", "generate", "--out", str(out), "--episodes", "2", "--frames", "3",
                              "--size", "16", "24"])
    assert args.func(args) == 0
    assert rt1.load_episode(out / "episode_000001.npz").image.shape == (3, 16, 24, 3)
    (out / "episode_000000.npz").write_bytes(b"truncated")
    args = parser.parse_args(["data", "check", str(out)])
    assert args.func(args) == 1
    assert "1 readable episode files, 1 corrupt" in capsys.readouterr().out


def test_frames_export_feeds_the_tokenizer_cli(tmp_path):
    """`rlvrw data frames` writes the training split's frames as the npz that `rlvrw tokenizer --frames` reads;
    a corrupt episode is skipped, the held-out episode 0 is left out."""
    from rlvrw.data.rt1 import save_episode
    from rlvrw.data.sim import export_frames
    from rlvrw.models.tokenizer_train import load_frames

    root = tmp_path / "episodes"
    for i in range(4):
        save_episode(root / f"episode_{i:06d}.npz", np.full((3, 8, 8, 3), i, np.uint8), np.zeros((3, 2), np.float32))
    (root / "episode_000004.npz").write_bytes(b"not an npz")
    out = tmp_path / "frames.npz"
    assert export_frames(root, out) == 9
    frames = load_frames(out, size=None)
    assert frames.shape == (9, 3, 8, 8) and set(frames.unique().tolist()) == {1, 2, 3}
    only_corrupt = tmp_path / "corrupt"
    only_corrupt.mkdir()
    (only_corrupt / "episode_000001.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="no readable episodes"):
        export_frames(only_corrupt, tmp_path / "none.npz")
