"""Training sequences cut from a token cache, and the clips of an episode.

Every step draws its global batch of clips from a generator seeded with (seed, step): an episode uniformly among those
long enough, then a start uniformly (``ClipSampler``). A resumed run therefore draws exactly the clips the interrupted
one would have. Clips are laid out with ``SequenceLayout.build``: single-step (``context_frames`` frames with their
actions, then the frame to predict) for a plain cache, multi-step for a cache with ``context_ids`` (whose rows are
clips already). Rank r of W takes rows [r*B*K, (r+1)*B*K) of the global batch (B sequences per micro-batch, K
micro-batches per step), so any split of one global batch over processes and micro-batches trains on the same
sequences.

``clip_times`` gives the frame indices of the clips of an episode (RLVR-World's clips: frames ``frame_skip`` apart,
starts ``stride`` apart); ``episode_stream`` reads the episodes of an episode directory (``rlvrw.data.rt1``'s format)
with their actions cut into bins.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from rlvrw.data import rt1
from rlvrw.data.actions import NUM_BINS, ActionDiscretizer
from rlvrw.data.sequences import SequenceLayout
from rlvrw.data.token_cache import TokenCache
from rlvrw.usage import UsageError

logger = logging.getLogger(__name__)


def clip_span(clip_frames: int, frame_skip: int) -> int:
    """Frames of an episode that one clip of ``clip_frames`` frames, ``frame_skip`` apart, covers."""
    return (clip_frames - 1) * frame_skip + 1


def clip_times(num_frames: int, clip_frames: int, frame_skip: int = 1, stride: int = 1) -> np.ndarray:
    """Frame indices (n, clip_frames) int64 of the clips of an episode of ``num_frames`` frames: clip i starts at
    frame i * ``stride`` and takes ``clip_frames`` frames ``frame_skip`` apart; every clip that fits, in order.
    ValueError when the episode is shorter than one clip."""
    span = clip_span(clip_frames, frame_skip)
    if num_frames < span:
        raise ValueError(f"{num_frames} frames, fewer than the {span} that a clip of {clip_frames} frames "
                         f"{frame_skip} apart covers")
    starts = np.arange(0, num_frames - span + 1, stride)
    return starts[:, None] + frame_skip * np.arange(clip_frames)

class ClipSampler:
    """The training sequences of every step, a pure function of (seed, step) (see the module doc)."""

    def __init__(self, cache: TokenCache, layout: SequenceLayout, frame_skip: int = 1, seed: int = 0):
        self.cache, self.layout, self.frame_skip, self.seed = cache, layout, frame_skip, seed
        self._check_ids()
        if cache.context_ids is not None and frame_skip != 1:
            raise UsageError(f"frame_skip must be 1 for a multi-step cache (its rows are clips), got {frame_skip}")
        self.span = (layout.num_frames - 1) * frame_skip + 1  # frames of an episode that one clip covers
        self.eligible = np.flatnonzero(cache.episode_lengths >= self.span)
        too_short = cache.num_episodes - self.eligible.size
        if self.eligible.size == 0:
            raise UsageError(f"no episode of the token cache has the {self.span} frames a clip needs "
                             f"({layout.num_frames} frames, frame_skip {frame_skip})")
        if too_short:
            logger.warning("%d of %d episodes are shorter than a clip (%d frames) and are never sampled",
                           too_short, cache.num_episodes, self.span)

    def _check_ids(self) -> None:
        layout, cache = self.layout, self.cache
        ranges = [("frame_ids", cache.frame_ids, layout.codebook_size),
                  ("action_bins", cache.action_bins, layout.action_bins)]
        if cache.context_ids is not None:
            ranges.append(("context_ids", cache.context_ids, layout.codebook_size))
        for name, array, upper in ranges:
            if int(array.max()) >= upper:
                raise UsageError(f"token cache {name} holds ids up to {int(array.max())}, the layout allows "
                                 f"[0, {upper})")

    def clips(self, step: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(episode (count,), start frame (count,)) of the global batch of ``step``."""
        rng = np.random.default_rng([self.seed, step])
        episodes = self.eligible[rng.integers(self.eligible.size, size=count)]
        if self.cache.context_ids is not None:
            return episodes, np.zeros(count, dtype=np.int64)
        room = self.cache.episode_lengths[episodes] - self.span + 1
        return episodes, (rng.random(count) * room).astype(np.int64)

    def sequences(self, step: int, global_batch: int, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of the global batch of ``step``, as whole sequences (rows, seq_len) int64 on the CPU."""
        episodes, starts = self.clips(step, global_batch)
        episodes, starts = episodes[rows], starts[rows]
        times = starts[:, None] + self.frame_skip * np.arange(self.layout.num_frames)
        frames = self.cache.frame_ids[episodes[:, None], times]
        actions = self.cache.action_bins[episodes[:, None], times[:, : self.layout.num_actions]]
        context = None if self.cache.context_ids is None else torch.from_numpy(
            self.cache.context_ids[episodes].astype(np.int64))
        return self.layout.build(torch.from_numpy(frames.astype(np.int64)),
                                 torch.from_numpy(actions.astype(np.int64)), context, check_values=False)


def layout_for_cache(cache: TokenCache, context_frames: int, codebook_size: int, action_bins: int) -> SequenceLayout:
    """The sequence layout of a cache: single-step, or multi-step for a cache with context ids (whose clips are
    its rows: ``context_frames`` in the prompt, the rest predicted). The cache's codebook size wins over
    ``codebook_size``."""
    codebook = cache.codebook_size or codebook_size
    if cache.context_ids is None:
        return SequenceLayout.single_step(cache.frame_tokens, context_frames, cache.action_dims, action_bins, codebook)
    predicted = int(cache.episode_lengths.min()) - context_frames
    if predicted < 1:
        raise UsageError(f"a multi-step cache needs clips longer than context_frames ({context_frames}); its shortest "
                         f"has {int(cache.episode_lengths.min())} frames")
    return SequenceLayout.multi_step(cache.context_ids.shape[1], cache.frame_tokens, context_frames, predicted,
                                     cache.action_dims, action_bins, codebook)

def episode_stream(root: str | Path, frame_size: tuple[int, int] | None = None, split: str = "train",
                   action_bins: int = NUM_BINS):
    """(frames (T, H, W, 3) uint8, action_bins (T, A)) of every readable episode of ``split`` in an episode
    directory (``rlvrw.data.rt1``'s format), actions cut into ``action_bins`` bins per dimension with the data set's
    statistics; unreadable files, episodes without actions and those of another action width are logged, skipped and
    counted."""
    discretizer = ActionDiscretizer.from_stats(rt1.dataset_action_stats(root), action_bins)
    skipped = 0
    for path in rt1.split_episodes(rt1.list_episodes(root), split):
        try:
            episode = rt1.load_episode(path)
            if episode.action is None:
                raise rt1.CorruptEpisodeError(f"{path}: no actions (an image-only episode)")
            if episode.action.shape[1] != discretizer.action_dims:
                raise rt1.CorruptEpisodeError(f"{path}: {episode.action.shape[1]}-D actions, but the data set's are "
                                              f"{discretizer.action_dims}-D")
        except rt1.CorruptEpisodeError as err:
            skipped += 1
            logger.warning("skipping episode file (%d skipped so far): %s", skipped, err)
            continue
        frames = torch.from_numpy(episode.image).permute(0, 3, 1, 2)
        if frame_size is not None:
            frames = rt1.resize_frames(frames, frame_size)
        yield frames.permute(0, 2, 3, 1), discretizer(episode.action)
