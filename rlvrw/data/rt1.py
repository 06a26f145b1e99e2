"""Robot-video episodes in the reference implementation's format, and the clips a world model trains on.

Episodes. One ``.npz`` file per episode, the files of a data set side by side in one directory (the format of the
iVideoGPT / RLVR-World converter ``oxe_data_converter.py``):

- ``image``: (T, H, W, 3) frames, uint8 (any integer dtype with values in [0, 255] is accepted: the BAIR sample
  stores int64);
- ``action`` (optional): (T, A) float, ``action[t]`` the action taken at frame t. RT-1 (``fractal20220817_data``) has
  A = 13 (``RT1_ACTION_KEYS``); PushT 2, Meta-World and BAIR 4. Image-only episodes (the RT-1 frames of the
  reference's samples) serve tokenizer training; world-model clips need actions.

Other arrays in a file (the simulators store ``task`` or ``block_pose``) are ignored.

Split (as the reference's dataset does it): the files sorted by name, every 100th (positions 0, 100, 200, ...) is the
test split and the rest is the training split. Per-dimension action statistics (min and max) come from the training
split and are stored beside the episodes in ``action_stats.json`` (``dataset_action_stats``); the action ids of every
split are computed with them.

Clips. ``EpisodeClips`` is a torch ``Dataset`` with one item per episode of a split: a clip of ``clip_frames``
frames, ``frame_skip`` steps apart, from a random start drawn from a generator seeded by (seed, epoch, index), so the
same index gives the same clip within an epoch in any worker (``set_epoch`` draws new starts). Clips of RLVR-World:
5 frames for single-step prediction (4 frames with their actions, then the frame to predict); 9 for multi-step (the
compressive tokenizer's context frame, then 8 frames: one in the prompt, 7 predicted). An episode shorter than a clip
is stretched as the reference does it: the step shrinks, then the last frame (and its action) repeats. An item is a
dict of tensors:

- ``frames``: uint8 (T, 3, H, W). Kept uint8 so that batches cross worker processes and the host-device link at a
  quarter of the float size; divide by 255 on the device for frames in [0, 1].
- ``actions``: float32 (T, A) and ``action_ids``: int64 (T, A) in [0, 256), when the clips have actions.
- ``episode``: int64, the position of the episode the clip came from within the split.

Corrupt or truncated files are not fatal: a file that cannot be read, or that does not hold a valid episode, is
logged with its path and the count of files skipped so far, and the clip comes from the next readable episode.
``EpisodeClips.verify`` reads every file up front, for a count before a long run. (Each DataLoader worker process
keeps its own count.) Where actions are needed (clips with actions, the action statistics), a file is corrupt too when
its actions are not finite numbers, when their count differs from its frames', when it has none (an image-only file
in a data set with actions) or when their width differs from the data set's (the width most files have):
``check_episodes`` sorts files into usable and corrupt, with the reason for each, and no corrupt file's actions ever
reach ``action_stats.json``.

Optional extras, not dependencies: ``convert_rlds`` turns an Open X-Embodiment RLDS data set into episodes (needs
``tensorflow_datasets``); ``DaliClipLoader`` resizes clips on the GPU with NVIDIA DALI (needs ``nvidia-dali``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlvrw.data.actions import ActionDiscretizer, ActionStats, compute_action_stats
from rlvrw import checks, files
from rlvrw.usage import MissingDependencyError, UsageError

logger = logging.getLogger(__name__)

IMAGE_KEY = "image"
ACTION_KEY = "action"
STATS_FILE = "action_stats.json"
TEST_EVERY = 100
SPLITS = ("train", "test", "all")
SINGLE_STEP_FRAMES = 5
MULTI_STEP_FRAMES = 9

# The order in which the RT-1 action fields are concatenated into 13 dimensions.
RT1_ACTION_KEYS = (
    ("world_vector", 3),
    ("rotation_delta", 3),
    ("gripper_closedness_action", 1),
    ("base_displacement_vector", 2),
    ("base_displacement_vertical_rotation", 1),
    ("terminate_episode", 3),
)


class CorruptEpisodeError(UsageError):
    """An episode file that cannot be read, or that does not hold a valid episode. The message names the file."""


@dataclass(frozen=True)
class Episode:
    """One episode: ``image`` uint8 (T, H, W, 3) (None when not loaded) and ``action`` float32 (T, A) or None."""

    image: np.ndarray
    action: np.ndarray | None


@dataclass(frozen=True)
class Clip:
    """A clip as stored: ``frames`` uint8 (T, H, W, 3) and ``actions`` float32 (T, A) or None, from the episode at
    position ``episode`` of its split."""

    frames: np.ndarray
    actions: np.ndarray | None
    episode: int


# ---- episode files --------------------------------------------------------------------------------------------------
def save_episode(path: str | Path, image: np.ndarray, action: np.ndarray | None = None,
                 extras: dict[str, np.ndarray] | None = None) -> None:
    """Write one episode file (compressed npz), atomically; the same arrays always give the same bytes.

    ``image`` (T, H, W, 3) uint8; ``action`` (T, A) float, stored as float32; ``extras``: more named arrays (no
    Python objects), stored as they are.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3 or image.shape[0] == 0:
        raise ValueError(f"image must be uint8 (T, H, W, 3) with T >= 1, got {image.dtype} {image.shape}")
    arrays = {IMAGE_KEY: image}
    if action is not None:
        action = np.asarray(action)
        if action.ndim != 2 or action.shape[0] != image.shape[0] or not np.issubdtype(action.dtype, np.number):
            raise ValueError(f"action must be numeric (T, A) with T = {image.shape[0]}, got {action.dtype} "
                             f"{action.shape}")
        if not np.isfinite(action).all():
            raise ValueError("action must be finite")
        arrays[ACTION_KEY] = action.astype(np.float32)
    for name, value in (extras or {}).items():
        if name in arrays:
            raise ValueError(f"extras must not reuse the name {name!r}")
        value = np.asarray(value)
        if value.dtype == object:
            raise ValueError(f"extras[{name!r}] must be a numeric or string array, not Python objects")
        arrays[name] = value
    # zipfile stamps the npz members with a fixed date (1980-01-01), so the bytes depend on the arrays alone
    files.write_file(path, lambda f: np.savez_compressed(f, **arrays))


def _as_frames(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[0] == 0:
        raise CorruptEpisodeError(f"{path}: image must be (T, H, W, 3) with T >= 1, got {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
        raise CorruptEpisodeError(f"{path}: image must hold integers in [0, 255], got {image.dtype}")
    return image.astype(np.uint8)


def _as_actions(action: np.ndarray, num_frames: int | None, path: Path) -> np.ndarray:
    if action.ndim != 2 or action.shape[0] == 0 or not np.issubdtype(action.dtype, np.number) \
            or np.issubdtype(action.dtype, np.complexfloating):
        raise CorruptEpisodeError(f"{path}: action must be real (T, A), got {action.dtype} {action.shape}")
    if num_frames is not None and action.shape[0] != num_frames:
        raise CorruptEpisodeError(f"{path}: {action.shape[0]} actions for {num_frames} frames")
    if not np.isfinite(action).all():
        raise CorruptEpisodeError(f"{path}: action holds a non-finite value")
    return action.astype(np.float32)


def _stored_shape(npz, key: str) -> tuple[int, ...]:
    """The shape of array ``key`` of an open npz file, from its header: nothing is decompressed past it."""
    with npz.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        return tuple(read_header(f)[0])


def load_episode(path: str | Path, *, image_key: str = IMAGE_KEY, image: bool = True,
                 action: bool = True) -> Episode:
    """Read an episode file; with ``image=False`` the frames are not decompressed (``Episode.image`` is None; their
    count still comes from the array's header).

    ``Episode.action`` is None when the file has no actions or ``action=False``. Raises ``CorruptEpisodeError``
    (naming the file) when the file cannot be read or its arrays are not a valid episode: among them, actions that
    are not finite real numbers or whose count differs from the frames'.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if image_key not in npz.files:
                raise CorruptEpisodeError(f"{path}: no {image_key!r} array (it has {sorted(npz.files)})")
            frames = _as_frames(npz[image_key], path) if image else None
            num_frames = frames.shape[0] if image else _stored_shape(npz, image_key)[0]
            actions = npz[ACTION_KEY] if action and ACTION_KEY in npz.files else None
    except CorruptEpisodeError:
        raise
    except Exception as err:  # any failure to read the file (bad zip, truncated member, bad header) is corruption
        raise CorruptEpisodeError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    if actions is not None:
        actions = _as_actions(actions, num_frames, path)
    return Episode(frames, actions)


@dataclass
class EpisodeCheck:
    """What ``check_episodes`` found: ``actions`` of each usable file (None for an image-only data set),
    ``corrupt`` {path: why} of the others, the data set's ``action_dims`` (None without actions), and the readable
    files without actions (``image_only``; corrupt where actions are needed)."""

    actions: dict[Path, np.ndarray | None]
    corrupt: dict[Path, str]
    action_dims: int | None
    image_only: list[Path]


def check_episodes(paths: Iterable[Path], *, image: bool = True, actions: bool | None = None,
                   image_key: str = IMAGE_KEY, progress: bool = False) -> EpisodeCheck:
    """Read every episode file of ``paths`` (frames decompressed and checked with ``image``) and sort them into
    usable and corrupt, each corrupt one logged with its reason and the count so far.

    ``actions``: True, every usable file must have actions, of the data set's width (the width most files have;
    among equals, the first file's); None, the same when any readable file has actions, else an image-only data set
    where actions are not read; False, actions are not read. A file is corrupt when it cannot be read, does not hold
    a valid episode (``load_episode``), or, with actions, has none or another width."""
    paths = list(paths)
    read: dict[Path, np.ndarray | None] = {}
    corrupt: dict[Path, str] = {}

    def mark(path: Path, why: str) -> None:
        corrupt[path] = why
        logger.warning("skipping corrupt episode file %s (%d skipped so far)", why, len(corrupt))

    for path in tqdm(paths, desc="checking episodes", unit="episode", disable=not progress):
        try:
            read[path] = load_episode(path, image_key=image_key, image=image, action=actions is not False).action
        except CorruptEpisodeError as err:
            mark(path, str(err))
    with_actions = [a for a in read.values() if a is not None]
    image_only = [path for path, action in read.items() if action is None]
    if actions is False or (actions is None and not with_actions):
        return EpisodeCheck({path: None for path in read}, corrupt, None, image_only)
    widths = [a.shape[1] for a in with_actions]
    width = max(widths, key=widths.count) if widths else None  # the first of the most common
    usable = {}
    for path, action in read.items():
        if action is None:
            mark(path, f"{path}: no {ACTION_KEY!r} array (an image-only episode in a data set with actions)")
        elif action.shape[1] != width:
            mark(path, f"{path}: {action.shape[1]}-D actions, but the data set's are {width}-D")
        else:
            usable[path] = action
    return EpisodeCheck(usable, dict(sorted(corrupt.items())), width, image_only)


def list_episodes(root: str | Path) -> list[Path]:
    """The episode files (``*.npz``) directly in ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"root must be a directory of episode files, got {str(root)!r}"
                         + (" (a file)" if root.exists() else " (no such directory)"))
    return sorted(path for path in root.glob("*.npz") if path.is_file())


def split_episodes(paths: Sequence[Path], split: str, test_every: int = TEST_EVERY) -> list[Path]:
    """The episodes of ``split`` ("train", "test" or "all") among ``paths`` (in the order given: sort them first)."""
    checks.choice("split", split, SPLITS)
    checks.integer("test_every", test_every)
    if split == "all":
        return list(paths)
    want_test = split == "test"
    return [path for i, path in enumerate(paths) if (i % test_every == 0) == want_test]


def _missing_actions(path: Path, image_only_dataset: bool = True) -> UsageError:
    if not image_only_dataset:
        return CorruptEpisodeError(f"{path}: no {ACTION_KEY!r} array (an image-only episode in a data set with "
                                   "actions)")
    return UsageError(
        f"episode {path} has no {ACTION_KEY!r} array, but world-model clips and action statistics need actions "
        "(image-only episodes serve tokenizer training: use EpisodeClips(..., actions=False))"
    )


# ---- action statistics ----------------------------------------------------------------------------------------------
def dataset_action_stats(root: str | Path, *, recompute: bool = False, test_every: int = TEST_EVERY,
                         progress: bool = False, check: EpisodeCheck | None = None) -> ActionStats:
    """The action statistics of the episodes in ``root``: read from ``root/action_stats.json``, or computed from
    the training split and written there. Only usable files count (``check_episodes``; corrupt ones, image-only
    ones and ones of another action width are skipped, logged and counted); ``check``: the result of a
    ``check_episodes`` over the training split (or more) already made, instead of reading the files again."""
    root = Path(root)
    stats_path = root / STATS_FILE
    if stats_path.exists() and not recompute:
        return ActionStats.load(stats_path)
    train = split_episodes(list_episodes(root), "train", test_every)
    if not train:
        raise UsageError(f"root {str(root)!r} has no training episodes to compute action statistics from (every "
                         f"{test_every}th file, the first included, is a test episode)")
    if check is None:
        check = check_episodes(train, image=False, actions=True, progress=progress)
    usable = [check.actions[path] for path in train if check.actions.get(path) is not None]
    skipped = [path for path in train if path in check.corrupt]
    if not usable:
        if check.image_only and check.action_dims is None:
            raise _missing_actions(check.image_only[0])
        reasons = "; ".join(check.corrupt[path] for path in skipped[:3])
        raise UsageError(f"root {str(root)!r} has no usable training episode with actions to compute action "
                         f"statistics from ({len(skipped)} corrupt: {reasons})")
    stats = compute_action_stats(usable)
    if skipped:
        logger.warning("action statistics of %s: skipped %d corrupt episode file(s)", root, len(skipped))
    try:
        stats.save(stats_path)
    except OSError as err:  # a read-only data set: the statistics still serve this run
        logger.warning("cannot store the action statistics in %s (%s); they are recomputed next time", stats_path, err)
    return stats


# ---- clips ----------------------------------------------------------------------------------------------------------
def clip_frame_indices(num_steps: int, clip_frames: int, frame_skip: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of a clip: a random start, then ``clip_frames`` frames ``frame_skip`` apart. When the episode is
    too short, the step shrinks (not below 1) and the last frame repeats."""
    step = frame_skip
    if clip_frames > 1 and step * (clip_frames - 1) >= num_steps:
        step = max(1, (num_steps - 1) // (clip_frames - 1))
    starts = max(num_steps - step * (clip_frames - 1), 1)
    start = int(rng.integers(starts))
    return np.minimum(start + step * np.arange(clip_frames), num_steps - 1)


def _frame_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be None, a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, *size), antialiased bilinear."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    resized = F.interpolate(frames.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


class EpisodeClips(torch.utils.data.Dataset):
    """Clips of the episodes of one split of a directory, one item per episode (see the module doc).

    Args:
        root: the directory of episode files.
        split: "train", "test" or "all".
        clip_frames: frames per clip: ``SINGLE_STEP_FRAMES`` (5) or ``MULTI_STEP_FRAMES`` (9) for RLVR-World.
        frame_skip: steps between consecutive clip frames.
        size: None (as stored), an int, or (height, width) to resize frames to.
        actions: whether items carry ``actions`` and ``action_ids``. False for tokenizer training on image-only
            episodes; with True, an episode without actions raises ValueError.
        discretizer: maps actions to ids; default: from the data set's statistics (``dataset_action_stats``).
        seed: seeds the clip starts, with the epoch and the index.
        image_key: the name of the frames array.
        test_every: the split's period.
    """

    def __init__(self, root: str | Path, split: str = "train", clip_frames: int = SINGLE_STEP_FRAMES, *,
                 frame_skip: int = 1, size=None, actions: bool = True,
                 discretizer: ActionDiscretizer | None = None, seed: int = 0, image_key: str = IMAGE_KEY,
                 test_every: int = TEST_EVERY):
        self.root = Path(root)
        self.split = split
        self.paths = split_episodes(list_episodes(self.root), split, test_every)
        if not self.paths:
            raise UsageError(f"root {str(self.root)!r} has no {split} episodes (*.npz files)")
        self.clip_frames = checks.integer("clip_frames", clip_frames)
        self.frame_skip = checks.integer("frame_skip", frame_skip)
        self.size = _frame_size(size)
        self.seed = checks.integer("seed", seed, low=0)
        self.epoch = 0
        self.image_key = image_key
        self.actions = bool(actions)
        if self.actions:
            self._check_has_actions()
        if self.actions and discretizer is None:
            discretizer = ActionDiscretizer.from_stats(dataset_action_stats(self.root, test_every=test_every))
        if discretizer is not None and not isinstance(discretizer, ActionDiscretizer):
            raise ValueError(f"discretizer must be an ActionDiscretizer, got {type(discretizer).__name__}")
        self.discretizer = discretizer if self.actions else None
        self._corrupt: dict[Path, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Draw the clip starts of another epoch (call it in every worker, as with a DistributedSampler)."""
        self.epoch = checks.integer("epoch", epoch, low=0)

    @property
    def skipped(self) -> list[Path]:
        """The corrupt episode files this process has found so far."""
        return sorted(self._corrupt)

    def read(self, index: int) -> Clip:
        """The clip of the episode at ``index``, as stored (no resize, no ids). Raises CorruptEpisodeError."""
        path = self.paths[index]
        episode = load_episode(path, image_key=self.image_key, action=self.actions)
        if self.actions and episode.action is None:
            raise _missing_actions(path, image_only_dataset=False)
        if self.actions and episode.action.shape[1] != self.discretizer.action_dims:
            raise CorruptEpisodeError(f"{path}: {episode.action.shape[1]}-D actions, but the data set's statistics "
                                      f"are {self.discretizer.action_dims}-D")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        indices = clip_frame_indices(episode.image.shape[0], self.clip_frames, self.frame_skip, rng)
        actions = episode.action[indices] if self.actions else None
        return Clip(episode.image[indices], actions, index)

    def read_or_skip(self, index: int) -> Clip:
        """``read(index)``, or when that episode is corrupt the clip of the next readable one (logged, counted)."""
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} episodes")
        for offset in range(len(self.paths)):
            position = (index + offset) % len(self.paths)
            if self.paths[position] in self._corrupt:
                continue
            try:
                return self.read(position)
            except CorruptEpisodeError as err:
                self._mark_corrupt(self.paths[position], err)
        raise RuntimeError(f"every {self.split} episode under {self.root} is corrupt ({len(self._corrupt)} files)")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip = self.read_or_skip(index)
        frames = torch.from_numpy(np.ascontiguousarray(clip.frames)).permute(0, 3, 1, 2).contiguous()
        if self.size is not None:
            frames = resize_frames(frames, self.size)
        item = {"frames": frames, "episode": torch.tensor(clip.episode, dtype=torch.int64)}
        if self.actions:
            item["actions"] = torch.from_numpy(clip.actions)
            item["action_ids"] = torch.from_numpy(self.discretizer(clip.actions))
        return item

    def verify(self, progress: bool = True) -> list[Path]:
        """Read every episode file once; the corrupt ones (``check_episodes``; with actions, also the image-only
        ones and those of another action width than the discretizer's) are logged, then skipped without another
        try. Returns them."""
        for path in tqdm(self.paths, desc=f"checking {self.split} episodes", unit="episode", disable=not progress):
            if path in self._corrupt:
                continue
            try:
                episode = load_episode(path, image_key=self.image_key, action=self.actions)
                if self.actions and episode.action is None:
                    raise _missing_actions(path, image_only_dataset=False)
                if self.actions and episode.action.shape[1] != self.discretizer.action_dims:
                    raise CorruptEpisodeError(f"{path}: {episode.action.shape[1]}-D actions, but the data set's "
                                              f"statistics are {self.discretizer.action_dims}-D")
            except CorruptEpisodeError as err:
                self._mark_corrupt(path, err)
        if self._corrupt:
            logger.warning("%s split of %s: %d of %d episode files are corrupt and skipped", self.split, self.root,
                           len(self._corrupt), len(self.paths))
        return self.skipped

    def _check_has_actions(self) -> None:
        """Fail early, and clearly, on an image-only data set: the files are read (headers only) until one has
        actions. An image-only or corrupt file among files with actions is left for the clips to skip."""
        image_only = None
        for path in self.paths:
            try:
                with np.load(path, allow_pickle=False) as npz:
                    if ACTION_KEY in npz.files:
                        return
                image_only = image_only or path
            except Exception:  # a corrupt file: the clips skip it
                continue
        if image_only is not None:
            raise _missing_actions(image_only)

    def _mark_corrupt(self, path: Path, err: Exception) -> None:
        self._corrupt[path] = str(err)
        logger.warning("skipping corrupt episode file %s (%d skipped so far)", err, len(self._corrupt))


# ---- optional: Open X-Embodiment RLDS -> episodes -------------------------------------------------------------------
def convert_rlds(builder_dir: str | Path, out_dir: str | Path, *, max_episodes: int | None = None,
                 image_key: str = IMAGE_KEY, action_keys: Sequence[tuple[str, int]] | None = RT1_ACTION_KEYS,
                 progress: bool = True) -> int:
    """Convert an Open X-Embodiment RLDS data set into episode files; returns the number of episodes in ``out_dir``.

    ``builder_dir`` is a TFDS builder directory, e.g. ``.../fractal20220817_data/0.1.0`` downloaded from
    ``gs://gresearch/robotics``. Each episode becomes ``<split>_eps_<i:08d>.npz`` (the reference's names) with the
    frames of ``observation[image_key]`` and the concatenation of ``action[key]`` over ``action_keys`` (RT-1's 13
    dimensions by default; None for image-only episodes). Existing files are kept, so an interrupted conversion
    resumes. The action statistics are computed at the end.

    Needs ``tensorflow`` and ``tensorflow_datasets``, which are not dependencies of rlvrw.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise MissingDependencyError("convert_rlds needs tensorflow_datasets (pip install tensorflow "
                                     "tensorflow-datasets); "
                          "it is not a dependency of rlvrw") from err
    if max_episodes is not None:
        checks.integer("max_episodes", max_episodes)
    out_dir = Path(out_dir)
    builder = tfds.builder_from_directory(builder_dir=str(builder_dir))
    converted = 0
    for split_name in sorted(builder.info.splits.keys()):
        episodes = tfds.as_numpy(builder.as_dataset(split=split_name))
        for i, episode in enumerate(tqdm(episodes, desc=f"converting {split_name}", unit="episode",
                                         disable=not progress)):
            if max_episodes is not None and converted >= max_episodes:
                break
            converted += 1
            path = out_dir / f"{split_name}_eps_{i:08d}.npz"
            if path.exists():
                continue
            frames, actions = [], []
            for step in episode["steps"]:
                frames.append(step["observation"][image_key])
                if action_keys:
                    actions.append(np.concatenate(
                        [np.asarray(step["action"][key], dtype=np.float32).reshape(dims) for key, dims in action_keys]
                    ))
            save_episode(path, np.stack(frames), np.stack(actions) if action_keys else None)
    if action_keys:
        dataset_action_stats(out_dir, recompute=True, progress=progress)
    return len(list_episodes(out_dir))


# ---- optional: GPU resize with NVIDIA DALI --------------------------------------------------------------------------
class DaliClipLoader:
    """Batches of ``clips`` with the frames resized on the GPU by NVIDIA DALI; needs ``nvidia-dali``.

    The same batches as ``DataLoader(clips, batch_size, sampler=indices)``: the clips (episode, start, actions, ids)
    come from ``clips.read_or_skip``, so they are identical; the frames are identical without a resize, and equal up
    to resampling rounding with one. The frames arrive on the GPU as uint8 (B, T, 3, H, W); the other tensors stay on
    the host. The episode files hold raw frames, so the CPU's share is unzipping them.
    """

    def __init__(self, clips: EpisodeClips, batch_size: int, indices: Sequence[int] | None = None,
                 device_id: int = 0, num_threads: int = 2):
        try:
            from nvidia.dali import fn, pipeline_def, types
            from nvidia.dali.plugin.pytorch import feed_ndarray
        except ImportError as err:
            raise MissingDependencyError("DaliClipLoader needs NVIDIA DALI (pip install nvidia-dali-cuda120)") from err
        self.clips = clips
        self.batch_size = checks.integer("batch_size", batch_size)
        self.indices = list(range(len(clips))) if indices is None else [int(i) for i in indices]
        self.device_id = device_id
        self._feed_ndarray = feed_ndarray
        size = clips.size

        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id,
                      prefetch_queue_depth=1)
        def pipeline():
            frames = fn.external_source(name="frames", device="cpu", layout="FHWC").gpu()
            if size is not None:
                frames = fn.resize(frames, size=list(size), interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.transpose(frames, perm=[0, 3, 1, 2], output_layout="FCHW")

        self._pipeline = pipeline()
        self._pipeline.build()

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for first in range(0, len(self.indices), self.batch_size):
            batch = [self.clips.read_or_skip(i) for i in self.indices[first:first + self.batch_size]]
            self._pipeline.feed_input("frames", [np.ascontiguousarray(clip.frames) for clip in batch])
            (frames,) = self._pipeline.run()
            frames = frames.as_tensor()
            out = torch.empty(frames.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            self._feed_ndarray(frames, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            item = {"frames": out, "episode": torch.tensor([clip.episode for clip in batch], dtype=torch.int64)}
            if self.clips.actions:
                actions = np.stack([clip.actions for clip in batch])
                item["actions"] = torch.from_numpy(actions)
                item["action_ids"] = torch.from_numpy(self.clips.discretizer(actions))
            yield item
