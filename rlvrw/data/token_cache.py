"""The token cache: a data set's frames as tokenizer ids, with their actions, in ``.npz`` files.

An ``.npz`` file, or a directory of them (read in name order and concatenated; unreadable or inconsistent files are
reported, skipped and counted), holding

    frame_ids        (E, T, N) int16 or int32   the tokenizer's codebook indices of frame t of episode e, the h x w
                                                grid flattened row by row (N = h*w)
    action_bins      (E, T, A) uint8            the discretized action taken at frame t (bins of
                                                ``rlvrw.data.actions.ActionDiscretizer``)
    episode_lengths  (E,) int, optional         the frames of episode e that are real (the rest is padding);
                                                default T for every episode
    codebook_size    () int, optional           the tokenizer's codebook size (checked against the ids)
    context_ids      (E, M) int, optional       multi-step caches only: the compressive tokenizer's context-frame ids.
                                                Its future-frame ids depend on the context frame, so every row of
                                                such a cache is one clip, used from frame 0, not an episode to cut.

``rlvrw.train.tokenize`` writes caches from episodes with a frozen tokenizer (the frame alignment of multi-step clips
is described there); ``rlvrw.data.clips`` cuts training sequences out of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlvrw import files
from rlvrw.usage import UsageError

logger = logging.getLogger(__name__)

ACTION_DTYPES = (np.uint8, np.int16, np.int32)  # the cache format's action_bins dtypes, narrowest first


@dataclass
class TokenCache:
    """A token cache in memory (see the module doc for the arrays)."""

    frame_ids: np.ndarray  # (E, T, N)
    action_bins: np.ndarray  # (E, T, A)
    episode_lengths: np.ndarray  # (E,) int64
    context_ids: np.ndarray | None = None  # (E, M)
    codebook_size: int | None = None
    skipped_files: list[str] = field(default_factory=list)

    @property
    def num_episodes(self) -> int:
        return self.frame_ids.shape[0]

    @property
    def frame_tokens(self) -> int:
        return self.frame_ids.shape[2]

    @property
    def action_dims(self) -> int:
        return self.action_bins.shape[2]


def narrowest_int(array: np.ndarray, candidates) -> np.ndarray:
    """``array`` in the first of ``candidates`` (numpy integer dtypes) that holds all its values."""
    high = int(array.max()) if array.size else 0
    for dtype in candidates:
        if high <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    raise ValueError(f"values up to {high} do not fit any of {candidates}")


def save_token_cache(
    path: str | Path,
    frame_ids: np.ndarray,
    action_bins: np.ndarray,
    episode_lengths: np.ndarray | None = None,
    context_ids: np.ndarray | None = None,
    codebook_size: int | None = None,
) -> None:
    """Write a token cache file atomically, ids in the narrowest dtype of the format (int16 / uint8 where they fit)."""
    cache = _validated_cache(frame_ids, action_bins, episode_lengths, context_ids, codebook_size, where="arguments")
    arrays = {
        "frame_ids": narrowest_int(cache.frame_ids, (np.int16, np.int32)),
        "action_bins": narrowest_int(cache.action_bins, ACTION_DTYPES),
        "episode_lengths": cache.episode_lengths.astype(np.int32),
    }
    if cache.context_ids is not None:
        arrays["context_ids"] = narrowest_int(cache.context_ids, (np.int16, np.int32))
    if cache.codebook_size is not None:
        arrays["codebook_size"] = np.asarray(cache.codebook_size, dtype=np.int64)
    files.write_file(path, lambda f: np.savez(f, **arrays))


def _validated_cache(frame_ids, action_bins, episode_lengths, context_ids, codebook_size, where: str) -> TokenCache:
    """A TokenCache from raw arrays, after checking their shapes, dtypes and ranges; ValueError naming ``where``."""
    arrays = {"frame_ids": np.asarray(frame_ids), "action_bins": np.asarray(action_bins)}
    if context_ids is not None:
        arrays["context_ids"] = np.asarray(context_ids)
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{where}: {name} must hold integers, got {array.dtype}")
        if array.size and array.min() < 0:
            raise ValueError(f"{where}: {name} holds negative ids")
    frames, actions = arrays["frame_ids"], arrays["action_bins"]
    if frames.ndim != 3 or 0 in frames.shape:
        raise ValueError(f"{where}: frame_ids must be a non-empty (E, T, N) array, got shape {frames.shape}")
    if actions.ndim != 3 or actions.shape[:2] != frames.shape[:2] or actions.shape[2] == 0:
        raise ValueError(f"{where}: action_bins must be (E, T, A) with (E, T) = {frames.shape[:2]}, got shape "
                         f"{actions.shape}")
    num_episodes, num_frames = frames.shape[:2]
    if episode_lengths is None:
        lengths = np.full(num_episodes, num_frames, dtype=np.int64)
    else:
        lengths = np.asarray(episode_lengths)
        if lengths.shape != (num_episodes,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"{where}: episode_lengths must be an integer (E,) = ({num_episodes},) array, got "
                             f"{lengths.dtype} {lengths.shape}")
        if lengths.min() < 1 or lengths.max() > num_frames:
            raise ValueError(f"{where}: episode_lengths must lie in [1, T={num_frames}]")
        lengths = lengths.astype(np.int64)
    context = arrays.get("context_ids")
    if context is not None and (context.ndim != 2 or context.shape[0] != num_episodes or context.shape[1] == 0):
        raise ValueError(f"{where}: context_ids must be (E, M) with E = {num_episodes}, got shape {context.shape}")
    if codebook_size is not None:
        codebook_size = int(codebook_size)
        for name in ("frame_ids", "context_ids"):
            if name in arrays and arrays[name].max() >= codebook_size:
                raise ValueError(f"{where}: {name} holds ids >= codebook_size {codebook_size}")
    return TokenCache(frames, actions, lengths, context, codebook_size)


def _read_cache_file(path: Path) -> TokenCache:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:  # any failure to read (bad zip, truncated member): the file is unusable
        raise ValueError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    for name in ("frame_ids", "action_bins"):
        if name not in arrays:
            raise ValueError(f"{path}: no {name!r} array (it has {sorted(arrays)})")
    codebook = arrays.get("codebook_size")
    return _validated_cache(arrays["frame_ids"], arrays["action_bins"], arrays.get("episode_lengths"),
                            arrays.get("context_ids"), None if codebook is None else int(codebook), where=str(path))


def pad_frames(array: np.ndarray, num_frames: int) -> np.ndarray:
    """(E, T, X) -> (E, num_frames, X), zero-padded at the end of the time axis."""
    missing = num_frames - array.shape[1]
    return array if missing == 0 else np.pad(array, ((0, 0), (0, missing), (0, 0)))


def _signature(cache: TokenCache) -> tuple:
    """What must agree between the files of one cache."""
    context = None if cache.context_ids is None else cache.context_ids.shape[1]
    return cache.frame_tokens, cache.action_dims, context, cache.codebook_size


def load_token_cache(path: str | Path) -> TokenCache:
    """Read a token cache: one ``.npz`` file, or every ``*.npz`` in a directory (name order), concatenated.

    A file that cannot be read or does not hold a valid cache, or whose token counts disagree with the first good
    file, is logged and skipped (``TokenCache.skipped_files``); ValueError when no file is usable.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.npz") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"path must be a token cache (.npz file or a directory of them), got {str(path)!r}")
    parts, skipped = [], []
    for file in files:
        try:
            part = _read_cache_file(file)
            if parts and _signature(part) != _signature(parts[0]):
                raise ValueError(f"{file}: (frame tokens, action dims, context tokens, codebook size) = "
                                 f"{_signature(part)}, but {files[0].name} and the others have {_signature(parts[0])}")
        except ValueError as err:
            skipped.append(str(file))
            logger.warning("skipping token cache file (%d skipped so far): %s", len(skipped), err)
            continue
        parts.append(part)
    if not parts:
        raise UsageError(f"path {str(path)!r} holds no usable token cache file ({len(skipped)} skipped)")
    num_frames = max(part.frame_ids.shape[1] for part in parts)
    contexts = [part.context_ids for part in parts]
    return TokenCache(
        frame_ids=np.concatenate([pad_frames(part.frame_ids, num_frames) for part in parts]),
        action_bins=np.concatenate([pad_frames(part.action_bins, num_frames) for part in parts]),
        episode_lengths=np.concatenate([part.episode_lengths for part in parts]),
        context_ids=None if contexts[0] is None else np.concatenate(contexts),
        codebook_size=parts[0].codebook_size,
        skipped_files=skipped,
    )
