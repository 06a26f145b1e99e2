"""Token caches (``rlvrw.data.token_cache``) written from episodes with a frozen tokenizer.

``tokenize_episodes`` writes a (single-step) cache with a per-frame tokenizer. A per-frame tokenizer gives a frame the
same ids whatever clip the frame is in, so tokenizing each frame once before training is the same as tokenizing clips
on the fly, at a fraction of the cost. ``tokenize_clips`` writes a multi-step cache with the compressive tokenizer,
clip by clip. A clip is the 1 + C + K episode frames s, s+k, ..., s+(C+K)k (k = ``frame_skip``), aligned as
iVideoGPT's ``CompressiveVQModel`` and RLVR-World's 9-frame RT-1 clips (``rlvrw.data.rt1.MULTI_STEP_FRAMES``) have it:
the context frame is the clip's first frame, a frame of its own, coded with M tokens (``context_ids``); the layout's
frames F_0 .. F_{C+K-1} (``SequenceLayout``'s doc) are the next C + K frames, each coded with N tokens against the
context frame (``frame_ids``); the action after F_j is the action taken at F_j (``action_bins[:, j]`` = the
episode's action at frame s+(1+j)k). The context frame's own action is not in the sequence: F_0 is given, not
predicted. Clips start every ``clip_stride`` frames (default: a clip's span, no overlap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from rlvrw import checks
from rlvrw.data.clips import clip_span, clip_times
from rlvrw.data.token_cache import ACTION_DTYPES, narrowest_int, pad_frames, save_token_cache
from rlvrw.models.tokenizer import CompressiveTokenizer
from rlvrw.usage import UsageError

logger = logging.getLogger(__name__)


def _episode_arrays(frames, action_bins) -> tuple[torch.Tensor, np.ndarray]:
    """(uint8 frames (T, 3, H, W), int64 action bins (T, A)) of one episode given as (T, H, W, 3) uint8 frames."""
    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    action_bins = np.asarray(action_bins.cpu() if isinstance(action_bins, torch.Tensor) else action_bins)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {tuple(frames.shape)}")
    if action_bins.ndim != 2 or action_bins.shape[0] != frames.shape[0] \
            or not np.issubdtype(action_bins.dtype, np.integer):
        raise ValueError(f"action_bins must be integer (T, A) with T = {frames.shape[0]}, got {action_bins.dtype} "
                         f"{action_bins.shape}")
    return frames.permute(0, 3, 1, 2), action_bins.astype(np.int64)


@torch.inference_mode()
def _encode_frames(tokenizer, frames: torch.Tensor, device: torch.device, frames_per_batch: int) -> np.ndarray:
    """uint8 frames (T, 3, H, W) -> ids (T, h*w) int64, ``frames_per_batch`` frames through the encoder at a time."""
    chunks = []
    for start in range(0, frames.shape[0], frames_per_batch):
        batch = frames[start : start + frames_per_batch].to(device).float().div_(255.0)
        ids = tokenizer.encode(batch)
        chunks.append(ids.reshape(ids.shape[0], -1).to("cpu", torch.int64).numpy())
    return np.concatenate(chunks)

@torch.inference_mode()
def encode_clips(tokenizer: CompressiveTokenizer, frames: torch.Tensor, times: np.ndarray, device: torch.device,
                 frames_per_batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips at ``times`` (n, 1 + F) of uint8 frames (T, 3, H, W) through a compressive tokenizer: each clip's
    frame 0 is its context frame and frames 1..F are coded against it. Returns (context ids (n, M), frame ids
    (n, F, N)), int64 on the CPU, grids flattened row by row; as many clips per encoder pass as fit in
    ``frames_per_batch`` frames (at least one)."""
    clips_per_batch = max(1, frames_per_batch // times.shape[1])
    contexts, futures = [], []
    for start in range(0, times.shape[0], clips_per_batch):
        index = torch.from_numpy(times[start : start + clips_per_batch])
        clips = frames[index].to(device).float().div_(255.0)  # (b, 1 + F, 3, H, W)
        context_ids, future_ids = tokenizer.encode(clips[:, 0], clips[:, 1:])
        contexts.append(context_ids.flatten(1).cpu())
        futures.append(future_ids.flatten(2).cpu())
    return torch.cat(contexts), torch.cat(futures)


def _check_encoding_settings(tokenizer, frames_per_batch, device) -> torch.device:
    """``frames_per_batch`` checked; the device the encoder runs on (default: the tokenizer's parameters')."""
    checks.integer("frames_per_batch", frames_per_batch)
    if device is None:
        parameter = next(iter(tokenizer.parameters()), None) if isinstance(tokenizer, nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.device(device)


def _ids_dtype(codebook_size: int | None) -> type:
    """The cache format's dtype for ids of a codebook: the ids of a whole data set stay in memory until the file is
    written, so they are kept narrow from the start."""
    return np.int16 if codebook_size is not None and codebook_size <= np.iinfo(np.int16).max + 1 else np.int32


def _sizes_past_first_axis(arrays: tuple) -> list[tuple]:
    """What must agree between the tokenized episodes of one cache: (tokens,), (action dims,) per frame, or the
    per-clip sizes."""
    return [array.shape[1:] for array in arrays]


def _tokenize_each(episodes: Iterable, tokenize: Callable, progress: bool) -> tuple[list[tuple], int]:
    """``tokenize(frames (T, 3, H, W) uint8, action_bins (T, A) int64)`` -> a tuple of arrays, for every usable
    episode of ``episodes`` (pairs as ``tokenize_episodes`` takes them). An episode that is malformed, that
    ``tokenize`` refuses (ValueError), or whose arrays' sizes past the first axis differ from the first usable
    episode's is logged, skipped and counted. Returns (the tuples, the count skipped); ValueError when none is
    usable."""
    from tqdm.auto import tqdm

    parts, skipped = [], 0
    for index, episode in enumerate(tqdm(episodes, desc="tokenizing", unit="episode", disable=not progress)):
        try:
            part = tokenize(*_episode_arrays(*episode))
            if parts and _sizes_past_first_axis(part) != _sizes_past_first_axis(parts[0]):
                raise ValueError(f"array sizes {_sizes_past_first_axis(part)} past the first axis; the first "
                                 f"episode's are {_sizes_past_first_axis(parts[0])}")
        except (TypeError, ValueError) as err:
            skipped += 1
            logger.warning("skipping episode %d (%d skipped so far): %s", index, skipped, err)
            continue
        parts.append(part)
    if not parts:
        raise UsageError(f"episodes held no usable episode ({skipped} skipped)")
    return parts, skipped


def tokenize_episodes(
    tokenizer,
    episodes: Iterable,
    out_path: str | Path,
    *,
    device: str | torch.device | None = None,
    frames_per_batch: int = 64,
    progress: bool = True,
) -> dict:
    """Encode every frame of ``episodes`` with a frozen per-frame ``tokenizer`` and write a token cache file.

    ``tokenizer``: anything with ``encode(frames (B, 3, H, W) float in [0, 1]) -> ids (B, h, w)`` (a
    ``FrameTokenizer``); its ``codebook_size`` is stored when it has one. ``episodes``: an iterable of
    ``(frames, action_bins)``, frames uint8 (T, H, W, 3) (episode files' layout, numpy or torch), action_bins integer
    (T, A). An episode that is malformed, or whose token or action counts differ from the first episode's, is logged
    and skipped. ``device``: where the encoder runs (default: the tokenizer's parameters' device). Returns
    {"episodes", "frames", "skipped", "path"}.
    """
    if not hasattr(tokenizer, "encode"):
        raise ValueError(f"tokenizer must have an encode(frames) method, got {type(tokenizer).__name__}")
    device = _check_encoding_settings(tokenizer, frames_per_batch, device)
    codebook_size = getattr(tokenizer, "codebook_size", None)
    ids_dtype = _ids_dtype(codebook_size)

    def tokenize(frames, actions):
        ids = _encode_frames(tokenizer, frames, device, frames_per_batch).astype(ids_dtype)
        return ids, narrowest_int(actions, ACTION_DTYPES)

    parts, skipped = _tokenize_each(episodes, tokenize, progress)
    lengths = np.array([ids.shape[0] for ids, _ in parts])
    num_frames = int(lengths.max())
    save_token_cache(
        out_path,
        np.stack([pad_frames(ids[None], num_frames)[0] for ids, _ in parts]),
        np.stack([pad_frames(actions[None], num_frames)[0] for _, actions in parts]),
        episode_lengths=lengths,
        codebook_size=codebook_size,
    )
    return {"episodes": len(parts), "frames": int(lengths.sum()), "skipped": skipped, "path": str(out_path)}


def tokenize_clips(
    tokenizer: CompressiveTokenizer,
    episodes: Iterable,
    out_path: str | Path,
    *,
    context_frames: int,
    predicted_frames: int,
    frame_skip: int = 1,
    clip_stride: int = 0,
    device: str | torch.device | None = None,
    frames_per_batch: int = 64,
    progress: bool = True,
) -> dict:
    """Cut ``episodes`` into multi-step clips, encode each with a frozen compressive ``tokenizer``, and write a
    multi-step token cache file: one row per clip (see the module doc for the frame alignment).

    A clip is 1 + C + K frames (C = ``context_frames``, K = ``predicted_frames``) ``frame_skip`` apart; an episode's
    clips start every ``clip_stride`` frames (0: every ``clip_span`` frames, so that clips do not overlap), and the
    frames after its last whole clip are left out. ``episodes``, ``device`` as for ``tokenize_episodes``; an episode
    that is malformed or shorter than a clip is logged, skipped and counted. The cache's frame ids are
    (clips, C + K, N), its action bins (clips, C + K, A), its context ids (clips, M). Returns {"episodes", "clips",
    "skipped", "path"}.
    """
    if not isinstance(tokenizer, CompressiveTokenizer):
        raise ValueError(f"tokenizer must be a CompressiveTokenizer, got {type(tokenizer).__name__}")
    for name, value in (("context_frames", context_frames), ("predicted_frames", predicted_frames),
                        ("frame_skip", frame_skip)):
        checks.integer(name, value)
    checks.integer("clip_stride", clip_stride, low=0)
    device = _check_encoding_settings(tokenizer, frames_per_batch, device)
    ids_dtype = _ids_dtype(tokenizer.codebook_size)
    clip_frames = 1 + context_frames + predicted_frames
    stride = clip_stride or clip_span(clip_frames, frame_skip)

    def tokenize(frames, actions):
        times = clip_times(frames.shape[0], clip_frames, frame_skip, stride)
        context_ids, frame_ids = encode_clips(tokenizer, frames, times, device, frames_per_batch)
        # the action after layout frame j is the one taken at that frame: clip frame j + 1's
        clip_actions = narrowest_int(actions[times[:, 1:]], ACTION_DTYPES)
        return context_ids.numpy().astype(ids_dtype), frame_ids.numpy().astype(ids_dtype), clip_actions

    parts, skipped = _tokenize_each(episodes, tokenize, progress)
    context_ids, frame_ids, action_bins = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    save_token_cache(out_path, frame_ids, action_bins, context_ids=context_ids,
                     codebook_size=tokenizer.codebook_size)
    return {"episodes": len(parts), "clips": int(frame_ids.shape[0]), "skipped": skipped, "path": str(out_path)}
