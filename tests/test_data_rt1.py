"""The episode reader: the real samples in examples/data (RT-1 frames, BAIR frames with actions), the split, the action
statistics, clip sampling, and corrupt files."""

import importlib.util
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_DATA

from rlvrw.data import rt1
from rlvrw.data.actions import ActionDiscretizer, ActionStats, compute_action_stats

VIDEO = EXAMPLE_DATA / "video"


def write_episode(root, name, num_frames, action_dims=2, actions=None, size=8):
    """An episode whose frame t is filled with the value t (mod 256), so a clip shows which steps it took."""
    image = np.broadcast_to((np.arange(num_frames) % 256).astype(np.uint8)[:, None, None, None],
                            (num_frames, size, size, 3))
    if actions is None and action_dims:
        actions = np.stack([np.arange(num_frames, dtype=np.float32)] * action_dims, axis=1)
    rt1.save_episode(root / name, np.ascontiguousarray(image), actions)
    return root / name


def steps_of(item):
    return item["frames"][:, 0, 0, 0].tolist()


# ---- the real samples ------------------------------------------------------------------------------------------------
def test_bair_sample_clips_with_actions(tmp_path):
    shutil.copy(VIDEO / "bair_sample.npz", tmp_path)
    with np.load(VIDEO / "bair_sample.npz") as npz:
        image, action = npz["image"], npz["action"]
    episode = rt1.load_episode(tmp_path / "bair_sample.npz")
    assert episode.image.dtype == np.uint8 and episode.image.shape == (30, 64, 64, 3)  # stored as int64
    np.testing.assert_array_equal(episode.image, image)
    discretizer = ActionDiscretizer.from_stats(compute_action_stats([episode.action]))
    clips = rt1.EpisodeClips(tmp_path, split="all", discretizer=discretizer, seed=3)
    item = clips[0]
    assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (5, 3, 64, 64)
    starts = [s for s in range(26) if np.array_equal(item["frames"].permute(0, 2, 3, 1).numpy(), image[s:s + 5])]
    assert len(starts) == 1, "a clip is 5 consecutive frames of the episode"
    start = starts[0]
    np.testing.assert_allclose(item["actions"].numpy(), action[start:start + 5].astype(np.float32))
    np.testing.assert_array_equal(item["action_ids"].numpy(), discretizer(action[start:start + 5]))
    assert item["action_ids"].min() >= 0 and item["action_ids"].max() <= 255
    batch = next(iter(torch.utils.data.DataLoader(clips, batch_size=1)))
    assert batch["frames"].shape == (1, 5, 3, 64, 64) and batch["action_ids"].shape == (1, 5, 4)


def test_fractal_sample_is_image_only(tmp_path):
    shutil.copy(VIDEO / "fractal_sample.npz", tmp_path)
    clips = rt1.EpisodeClips(tmp_path, split="all", clip_frames=rt1.MULTI_STEP_FRAMES, actions=False)
    item = clips[0]
    assert set(item) == {"frames", "episode"}
    assert item["frames"].shape == (9, 3, 256, 320) and item["frames"].dtype == torch.uint8
    small = rt1.EpisodeClips(tmp_path, split="all", actions=False, size=(64, 80))[0]["frames"]
    assert small.shape == (5, 3, 64, 80) and small.float().std() > 10  # a real picture, not a blank
    with pytest.raises(ValueError, match="no 'action' array.*actions=False"):
        rt1.EpisodeClips(tmp_path, split="all")


def test_sample_directory_reads_in_place():
    paths = rt1.list_episodes(VIDEO)
    assert [p.name for p in paths] == ["bair_sample.npz", "fractal_sample.npz"]
    assert rt1.load_episode(paths[1]).action is None
    assert rt1.load_episode(paths[0], image=False).action.shape == (30, 4)


# ---- split and statistics -------------------------------------------------------------------------------------------
def test_every_100th_episode_is_test():
    paths = [f"ep{i:04d}" for i in range(250)]
    test = rt1.split_episodes(paths, "test")
    train = rt1.split_episodes(paths, "train")
    assert test == ["ep0000", "ep0100", "ep0200"]
    assert len(train) == 247 and not set(train) & set(test)
    assert rt1.split_episodes(paths, "all") == paths
    with pytest.raises(ValueError, match="split"):
        rt1.split_episodes(paths, "val")
    with pytest.raises(ValueError, match="test_every"):
        rt1.split_episodes(paths, "train", test_every=0)


def test_action_stats_come_from_the_training_split(tmp_path):
    write_episode(tmp_path, "a.npz", 4, actions=np.full((4, 2), 100.0))  # position 0: test
    write_episode(tmp_path, "b.npz", 4, actions=np.array([[0, 1], [2, 3], [1, 1], [0, 2]], dtype=np.float32))
    write_episode(tmp_path, "c.npz", 4, actions=np.full((4, 2), -100.0))  # position 2: test
    stats = rt1.dataset_action_stats(tmp_path, test_every=2)
    assert stats.low.tolist() == [0.0, 1.0] and stats.high.tolist() == [2.0, 3.0]
    assert ActionStats.load(tmp_path / rt1.STATS_FILE).high.tolist() == [2.0, 3.0]
    test_clips = rt1.EpisodeClips(tmp_path, split="test", clip_frames=2, test_every=2)
    assert test_clips[0]["action_ids"].unique().tolist() == [255]  # above the training maximum
    assert test_clips[1]["action_ids"].unique().tolist() == [0]


# ---- clips ----------------------------------------------------------------------------------------------------------
def test_clip_start_is_seeded_by_index(tmp_path):
    for i in range(3):
        write_episode(tmp_path, f"ep{i}.npz", 100)
    clips = rt1.EpisodeClips(tmp_path, split="all", clip_frames=5, frame_skip=3, seed=7)
    first = [steps_of(clips[i]) for i in range(3)]
    assert first == [steps_of(clips[i]) for i in range(3)], "the same index gives the same clip"
    for steps in first:
        assert np.diff(steps).tolist() == [3, 3, 3, 3]
    clips.set_epoch(1)
    assert [steps_of(clips[i]) for i in range(3)] != first
    other_seed = rt1.EpisodeClips(tmp_path, split="all", clip_frames=5, frame_skip=3, seed=8)
    assert [steps_of(other_seed[i]) for i in range(3)] != first


def test_short_episodes_shrink_the_step_then_repeat_the_last_frame(tmp_path):
    write_episode(tmp_path, "a.npz", 3)
    write_episode(tmp_path, "b.npz", 7)
    clips = rt1.EpisodeClips(tmp_path, split="all", clip_frames=5, frame_skip=2)
    item = clips[0]
    assert steps_of(item) == [0, 1, 2, 2, 2]
    assert item["actions"][:, 0].tolist() == [0, 1, 2, 2, 2]
    steps = steps_of(clips[1])
    assert np.diff(steps).tolist() == [1, 1, 1, 1] and steps[-1] <= 6


def test_missing_actions_with_a_given_discretizer(tmp_path):
    write_episode(tmp_path, "a.npz", 6, action_dims=0)
    with pytest.raises(ValueError, match="no 'action' array"):
        rt1.EpisodeClips(tmp_path, split="all", discretizer=ActionDiscretizer([0.0], [1.0]))


def test_bad_arguments(tmp_path):
    write_episode(tmp_path, "a.npz", 6)
    with pytest.raises(ValueError, match="root"):
        rt1.EpisodeClips(tmp_path / "missing")
    with pytest.raises(ValueError, match="no train episodes"):
        rt1.EpisodeClips(tmp_path, split="train", actions=False)
    for kwargs, name in [({"clip_frames": 0}, "clip_frames"), ({"frame_skip": 1.5}, "frame_skip"),
                         ({"size": (0, 4)}, "size"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=name):
            rt1.EpisodeClips(tmp_path, split="all", actions=False, **kwargs)
    with pytest.raises(ValueError, match="image"):
        rt1.save_episode(tmp_path / "b.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="action"):
        rt1.save_episode(tmp_path / "b.npz", np.zeros((2, 4, 4, 3), np.uint8), np.zeros((3, 2)))


def test_saved_episodes_are_byte_identical(tmp_path):
    a = write_episode(tmp_path, "a.npz", 5)
    b = write_episode(tmp_path, "b.npz", 5)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"], "no temporary files left behind"


# ---- corrupt files --------------------------------------------------------------------------------------------------
def test_corrupt_and_truncated_files_are_skipped_logged_and_counted(tmp_path, caplog):
    for i in range(5):
        write_episode(tmp_path, f"ep{i}.npz", 10)
    truncated = tmp_path / "ep1.npz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage = tmp_path / "ep3.npz"
    garbage.write_bytes(b"not a zip file at all")
    stats = ActionStats(np.zeros(2), np.full(2, 9.0), 1, 10)
    clips = rt1.EpisodeClips(tmp_path, split="all", clip_frames=4, discretizer=ActionDiscretizer.from_stats(stats))
    with caplog.at_level(logging.WARNING, logger="rlvrw.data.rt1"):
        episodes = [int(clips[i]["episode"]) for i in range(5)]
        batches = list(torch.utils.data.DataLoader(clips, batch_size=2))
    assert episodes == [0, 2, 2, 4, 4], "a corrupt episode's clip comes from the next readable one"
    assert sum(len(b["episode"]) for b in batches) == 5
    assert clips.skipped == [truncated, garbage]
    assert str(truncated) in caplog.text and str(garbage) in caplog.text and "2 skipped so far" in caplog.text

    fresh = rt1.EpisodeClips(tmp_path, split="all", actions=False)
    with caplog.at_level(logging.WARNING, logger="rlvrw.data.rt1"):
        assert fresh.verify(progress=False) == [truncated, garbage]
    assert "2 of 5 episode files are corrupt" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlvrw.data.rt1"):
        stats = rt1.dataset_action_stats(tmp_path, test_every=100, recompute=True)
    assert stats.num_episodes == 2  # ep2 and ep4: ep0 is the test episode, ep1 and ep3 are corrupt
    assert "skipped 2 corrupt episode file(s)" in caplog.text


def test_all_corrupt_raises(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"\x00" * 10)
    clips = rt1.EpisodeClips(tmp_path, split="all", actions=False)
    with pytest.raises(RuntimeError, match="corrupt"):
        clips[0]


# ---- optional extras ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None,
                    reason="tensorflow_datasets is installed: the converter would run")
def test_rlds_converter_says_what_it_needs(tmp_path):
    with pytest.raises(ImportError, match="tensorflow_datasets"):
        rt1.convert_rlds(tmp_path / "fractal20220817_data" / "0.1.0", tmp_path / "out")


@pytest.mark.skipif(importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali")
                    is not None, reason="NVIDIA DALI is installed")
def test_dali_loader_says_what_it_needs(tmp_path):
    write_episode(tmp_path, "a.npz", 6)
    clips = rt1.EpisodeClips(tmp_path, split="all", actions=False)
    with pytest.raises(ImportError, match="nvidia-dali"):
        rt1.DaliClipLoader(clips, batch_size=2)


# ---- bad actions and missing arrays ----------------------------------------------------------------------------------
def bad_arrays(kind: str) -> dict:
    """The arrays of an episode file that is corrupt in the way ``kind`` names; its finite actions hold 1e6, so
    they would show in the statistics if they reached them."""
    image = np.zeros((6, 8, 8, 3), np.uint8)
    actions = np.full((6, 2), 1e6, np.float32)
    return {
        "nan action": {"image": image, "action": np.where(np.eye(6, 2, dtype=bool), np.nan, actions)},
        "inf action": {"image": image, "action": np.where(np.eye(6, 2, dtype=bool), -np.inf, actions)},
        "string actions": {"image": image, "action": np.full((6, 2), "left")},
        "more actions than frames": {"image": image, "action": np.full((7, 2), 1e6, np.float32)},
        "fewer actions than frames": {"image": image, "action": actions[:5]},
        "another action width": {"image": image, "action": np.full((6, 3), 1e6, np.float32)},
        "image-only": {"image": image},
        "no image": {"action": actions},
        "1-D actions": {"image": image, "action": actions[:, 0]},
    }[kind]


BAD_KINDS = ["nan action", "inf action", "string actions", "more actions than frames", "fewer actions than frames",
             "another action width", "image-only", "no image", "1-D actions"]
BAD_WORDS = {"nan action": "non-finite", "inf action": "non-finite", "string actions": "must be real",
             "more actions than frames": "7 actions for 6 frames", "fewer actions than frames": "5 actions for 6",
             "another action width": "3-D actions, but the data set's are 2-D", "image-only": "image-only",
             "no image": "no 'image' array", "1-D actions": "must be real (T, A)"}


@pytest.fixture(params=BAD_KINDS)
def dataset_with_a_bad_file(request, tmp_path):
    """Four good episodes (ep0 is the test split's) and one bad one in the training split."""
    for i in range(4):
        write_episode(tmp_path, f"ep{i}.npz", 6)
    bad = tmp_path / "ep4_bad.npz"
    np.savez_compressed(bad, **bad_arrays(request.param))
    return tmp_path, bad, request.param


def test_bad_actions_and_missing_arrays_never_reach_the_statistics(dataset_with_a_bad_file, caplog):
    root, bad, kind = dataset_with_a_bad_file
    with caplog.at_level(logging.WARNING, logger="rlvrw.data.rt1"):
        stats = rt1.dataset_action_stats(root, recompute=True)
    assert stats.num_episodes == 3 and stats.high.tolist() == [5.0, 5.0]  # ep1..ep3, actions 0..5
    assert str(bad) in caplog.text and BAD_WORDS[kind] in caplog.text
    check = rt1.check_episodes(rt1.list_episodes(root))
    assert list(check.corrupt) == [bad] and BAD_WORDS[kind] in check.corrupt[bad] and len(check.actions) == 4


def test_training_readers_skip_and_count_a_bad_file(dataset_with_a_bad_file):
    from rlvrw.data.clips import episode_stream

    root, bad, _ = dataset_with_a_bad_file
    clips = rt1.EpisodeClips(root, split="all", clip_frames=3)
    episodes = [int(clips[i]["episode"]) for i in range(len(clips))]
    assert episodes == [0, 1, 2, 3, 0] and clips.skipped == [bad]  # the bad one's clip comes from the next readable
    assert rt1.EpisodeClips(root, split="all", clip_frames=3).verify(progress=False) == [bad]
    streamed = list(episode_stream(root))  # what pretrain tokenizes and eval scores
    assert len(streamed) == 3 and all(bins.shape == (6, 2) for _, bins in streamed)


def test_an_image_only_first_file_does_not_stop_a_data_set_with_actions(tmp_path):
    np.savez_compressed(tmp_path / "a_image_only.npz", image=np.zeros((6, 8, 8, 3), np.uint8))
    for i in range(3):
        write_episode(tmp_path, f"ep{i}.npz", 6)
    clips = rt1.EpisodeClips(tmp_path, split="all", clip_frames=2)
    assert [int(clips[i]["episode"]) for i in range(4)] == [1, 1, 2, 3]
    assert clips.skipped == [tmp_path / "a_image_only.npz"]


def test_episode_file_headers_give_the_frame_count_without_decompressing(tmp_path):
    np.savez_compressed(tmp_path / "a.npz", image=np.zeros((6, 8, 8, 3), np.uint8), action=np.zeros((4, 2)))
    with pytest.raises(rt1.CorruptEpisodeError, match="4 actions for 6 frames"):
        rt1.load_episode(tmp_path / "a.npz", image=False)


def test_data_check_names_counts_and_exits_1(dataset_with_a_bad_file, capsys):
    """`rlvrw data check` reads every array of every file: a bad file is named with its reason and counted, the
    statistics it writes leave it out, and the exit code is 1 (it exited 0 for bad actions, or died on an image-only
    file or another action width)."""
    from rlvrw.cli import main

    root, bad, kind = dataset_with_a_bad_file
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "4 readable episode files, 1 corrupt" in out
    assert f"  corrupt: {bad}" in out and BAD_WORDS[kind] in out
    stats = ActionStats.load(root / rt1.STATS_FILE)
    assert stats.num_episodes == 3 and stats.high.tolist() == [5.0, 5.0]


def test_data_check_of_a_clean_data_set_exits_0(tmp_path, capsys):
    from rlvrw.cli import main

    for i in range(3):
        write_episode(tmp_path, f"ep{i}.npz", 6)
    assert main(["data", "check", str(tmp_path)]) == 0
    assert "3 readable episode files, 0 corrupt" in capsys.readouterr().out
    image_only = tmp_path / "frames_only"
    image_only.mkdir()
    np.savez_compressed(image_only / "a.npz", image=np.zeros((6, 8, 8, 3), np.uint8))
    assert main(["data", "check", str(image_only)]) == 0  # an image-only data set is no corrupt one
    out = capsys.readouterr().out
    assert "1 readable episode files, 0 corrupt" in out and "action statistics" not in out
