"""MLE pre-training of the world model on token sequences, and the ``rlvrw pretrain`` command.

Data: a token cache
-------------------
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

``tokenize_episodes`` writes a (single-step) cache from episodes with a frozen per-frame tokenizer. A per-frame
tokenizer gives a frame the same ids whatever clip the frame is in, so tokenizing each frame once before training is
the same as tokenizing clips on the fly, at a fraction of the cost. ``tokenize_clips`` writes a multi-step cache with
the compressive tokenizer, clip by clip. A clip is the 1 + C + K episode frames s, s+k, ..., s+(C+K)k
(k = ``frame_skip``), aligned as iVideoGPT's ``CompressiveVQModel`` and RLVR-World's 9-frame RT-1 clips
(``rlvrw.data.rt1.MULTI_STEP_FRAMES``) have it: the context frame is the clip's first frame, a frame of its own,
coded with M tokens (``context_ids``); the layout's frames F_0 .. F_{C+K-1} (``SequenceLayout``'s doc) are the next
C + K frames, each coded with N tokens against the context frame (``frame_ids``); the action after F_j is the action
taken at F_j (``action_bins[:, j]`` = the episode's action at frame s+(1+j)k). The context frame's own action is not
in the sequence: F_0 is given, not predicted. Clips start every ``clip_stride`` frames (default: a clip's span, no
overlap). ``rlvrw pretrain --episodes DIR --tokenizer CKPT`` first writes the cache of its tokenizer's kind (into
``OUT/tokens.npz``), then trains.

Sequences
---------
Every step draws its global batch of clips from a generator seeded with (seed, step): an episode uniformly among those
long enough, then a start uniformly. A resumed run therefore draws exactly the clips the interrupted one would have.
Clips are laid out with ``SequenceLayout.build``: single-step (``context_frames`` frames with their actions, then the
frame to predict) for a plain cache, multi-step for a cache with ``context_ids``. Rank r of W takes rows
[r*B*K, (r+1)*B*K) of the global batch (B sequences per micro-batch, K micro-batches per step), so any split of one
global batch over processes and micro-batches trains on the same sequences.

Loss and optimization
---------------------
Cross-entropy of the predicted frame tokens (the layout's loss mask), from the final hidden states and the output
layer through ``ops.linear_token_logprobs``: no (B, T, V) logits, and the output layer runs on the masked positions
only. Micro-batch losses are sums divided by the global number of loss tokens, so accumulation and data parallelism
give the gradient of one big batch. AdamW (no weight decay on norms), linear warmup then cosine decay to
``min_lr_ratio`` of the peak, gradient clipping; bf16 autocast on a GPU (fp32 master weights), fp32 on CPU.

Runs
----
``OUT/`` receives ``config.json``, ``metrics.jsonl`` (and ``tensorboard/``), ``checkpoints/step_*`` (see
``rlvrw.rl.checkpoint``; each one also loads with ``WorldModelTransformer.from_pretrained``) and, at the end,
``model/``: the pre-trained world model for the RL stage. A run finds the newest checkpoint in ``OUT/checkpoints`` and
continues from it; on CPU the continuation is bit-identical to an uninterrupted run.

    rlvrw pretrain --data tokens.npz --out runs/pretrain --steps 2000
    torchrun --nproc-per-node 8 -m rlvrw.rl.pretrain --data tokens.npz --out runs/wm --model base --parallel ddp
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import rlvrw.ops as ops
from rlvrw.data.actions import NUM_BINS
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models.tokenizer import CompressiveTokenizer
from rlvrw.models.transformer import ATTENTION_BACKENDS, WorldModelConfig, WorldModelTransformer
from rlvrw import checks
from rlvrw import files, usage
from rlvrw.guard import ON_NONFINITE, ON_NONFINITE_HELP, NonFiniteGuard
from rlvrw.rl import checkpoint, distributed
from rlvrw.rl.checkpoint import RESUME_HELP
from rlvrw.rl.config import RunConfig, check_model_dir, check_token_cache, config_command, option, print_summary
from rlvrw.rl.logging import TENSORBOARD_CHOICES, RunLogger
from rlvrw.usage import UsageError

logger = logging.getLogger(__name__)

CACHE_FILE = "tokens.npz"
ACTION_DTYPES = (np.uint8, np.int16, np.int32)  # the cache format's action_bins dtypes, narrowest first
PRECISIONS = ("auto", "bf16", "fp32")
MODEL_SIZES = ("small", "base")
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU; matched against the device name.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12),
)


# ----------------------------------------------------------------------------------------------------------------------
# The token cache
# ----------------------------------------------------------------------------------------------------------------------


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


def _narrowest_int(array: np.ndarray, candidates) -> np.ndarray:
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
        "frame_ids": _narrowest_int(cache.frame_ids, (np.int16, np.int32)),
        "action_bins": _narrowest_int(cache.action_bins, ACTION_DTYPES),
        "episode_lengths": cache.episode_lengths.astype(np.int32),
    }
    if cache.context_ids is not None:
        arrays["context_ids"] = _narrowest_int(cache.context_ids, (np.int16, np.int32))
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


def _pad_frames(array: np.ndarray, num_frames: int) -> np.ndarray:
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
        frame_ids=np.concatenate([_pad_frames(part.frame_ids, num_frames) for part in parts]),
        action_bins=np.concatenate([_pad_frames(part.action_bins, num_frames) for part in parts]),
        episode_lengths=np.concatenate([part.episode_lengths for part in parts]),
        context_ids=None if contexts[0] is None else np.concatenate(contexts),
        codebook_size=parts[0].codebook_size,
        skipped_files=skipped,
    )


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
        return ids, _narrowest_int(actions, ACTION_DTYPES)

    parts, skipped = _tokenize_each(episodes, tokenize, progress)
    lengths = np.array([ids.shape[0] for ids, _ in parts])
    num_frames = int(lengths.max())
    save_token_cache(
        out_path,
        np.stack([_pad_frames(ids[None], num_frames)[0] for ids, _ in parts]),
        np.stack([_pad_frames(actions[None], num_frames)[0] for _, actions in parts]),
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
        clip_actions = _narrowest_int(actions[times[:, 1:]], ACTION_DTYPES)
        return context_ids.numpy().astype(ids_dtype), frame_ids.numpy().astype(ids_dtype), clip_actions

    parts, skipped = _tokenize_each(episodes, tokenize, progress)
    context_ids, frame_ids, action_bins = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    save_token_cache(out_path, frame_ids, action_bins, context_ids=context_ids,
                     codebook_size=tokenizer.codebook_size)
    return {"episodes": len(parts), "clips": int(frame_ids.shape[0]), "skipped": skipped, "path": str(out_path)}


# ----------------------------------------------------------------------------------------------------------------------
# Clips -> sequences
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------------


class NextTokenLoss(nn.Module):
    """The summed negative log-likelihood of the predicted frame tokens of whole sequences (B, L) under
    ``world_model``. It is the module that DDP and FSDP2 wrap, so that the output layer is used inside a forward
    pass (where FSDP2 has gathered it)."""

    def __init__(self, world_model: WorldModelTransformer, layout: SequenceLayout):
        super().__init__()
        self.world_model = world_model
        # output position t is scored against token t+1: the positions before each loss token
        positions = layout.tables().loss_mask[1:].nonzero().squeeze(1)
        self.register_buffer("target_positions", positions, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.world_model(ids[:, :-1], return_logits=False)[:, self.target_positions]
        targets = ids[:, 1:][:, self.target_positions]
        weight = self.world_model.lm_head.weight
        device_type = ids.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        logp = ops.linear_token_logprobs(hidden.to(dtype), weight.to(dtype), targets)
        return -logp.sum()


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


POSITIVE_INT_FIELDS = ("context_frames", "predicted_frames", "frame_skip", "codebook_size", "action_bins", "steps",
                       "micro_batch_size", "grad_accum_steps", "log_every", "save_every", "keep_checkpoints")
NON_NEGATIVE_FIELDS = ("clip_stride", "warmup_steps", "weight_decay", "grad_clip", "seed", "stop_at_step")


@dataclass
class PretrainConfig(RunConfig):
    """Everything ``pretrain`` needs; every field is also a command-line flag (``--micro-batch-size 8``)."""

    data: str = option("", "token cache: an .npz file or a directory of them (format: rlvrw.rl.pretrain's doc)")
    out_dir: str = option("runs/pretrain", "run directory: checkpoints, logs, the final model")
    episodes: str = option("", "instead of --data: a directory of episode .npz files, tokenized first")
    tokenizer: str = option("", "with --episodes: a FrameTokenizer checkpoint (single-step cache) or a "
                                 "CompressiveTokenizer one (multi-step clips; `rlvrw train "
                                 "tokenizer_kind=compressive` trains one)")
    frame_size: tuple[int, int] | None = option(None, "with --episodes: resize frames to H W before tokenizing",
                                       nargs=2, type=int, metavar=("H", "W"))
    context_frames: int = option(4, "frames (with their actions) in the prompt")
    predicted_frames: int = option(7, "with --episodes and a CompressiveTokenizer: frames predicted per "
                                      "multi-step clip (RLVR-World: 7)")
    frame_skip: int = option(1, "steps between the frames of a clip")
    clip_stride: int = option(0, "with --episodes and a CompressiveTokenizer: frames between the starts of an "
                                 "episode's clips (0: a clip's span, no overlap)")
    codebook_size: int = option(4375, "frame codebook size, when the cache does not store it")
    action_bins: int = option(256, "bins per action dimension")
    model: str = option("small", "model size: 'small' (CPU-sized) or 'base' (the paper's 120M)",
                         choices=MODEL_SIZES)
    model_overrides: dict = option({}, "WorldModelConfig fields over the size's, as JSON", type=json.loads)
    copy_prior: bool = option(False, "a fresh model gets the learned copy prior: each frame token's input also "
                                      "embeds the id at its place in the previous frame (WorldModelConfig."
                                      "copy_prior_offset)")
    init_from: str = option("", "start from this Hugging Face LlamaForCausalLM directory instead")
    attention_backend: str = option("auto", "attention kernels", choices=ATTENTION_BACKENDS)
    steps: int = option(1000, "optimizer steps of the whole schedule")
    micro_batch_size: int = option(8, "sequences per forward pass, per process")
    grad_accum_steps: int = option(1, "micro-batches per step (global batch = micro x accum x processes)")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this fraction of the peak")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.01, "AdamW weight decay (not on norm weights)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas", nargs=2, type=float, metavar=("B1", "B2"))
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = option(0, "seeds the initialization and the clips")
    precision: str = option("auto", "auto (bf16 autocast on a GPU, fp32 on CPU), bf16 or fp32", choices=PRECISIONS)
    device: str = option("auto", "auto, cpu or cuda")
    parallel: str = option("ddp", "data parallelism under torchrun: ddp or fsdp (FSDP2)",
                            choices=distributed.STRATEGIES)
    compile: bool = option(False, "torch.compile each decoder layer")
    log_every: int = option(10, "log every this many steps")
    save_every: int = option(500, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept (older ones are deleted)")
    resume: bool | None = option(None, RESUME_HELP)
    on_nonfinite: str = option("stop", ON_NONFINITE_HELP, choices=ON_NONFINITE)
    stop_at_step: int = option(0, "end this run after this step, schedule unchanged (0: train all steps)")
    tensorboard: str = option("auto", "TensorBoard logs: auto (when installed), on or off",
                               choices=TENSORBOARD_CHOICES)
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        super().__post_init__()
        if self.frame_size is not None:
            self.frame_size = tuple(self.frame_size)
        self.betas = tuple(self.betas)
        for name in POSITIVE_INT_FIELDS:
            checks.integer(name, getattr(self, name))
        for name in NON_NEGATIVE_FIELDS:
            checks.number(name, getattr(self, name), low=0)
        checks.positive("lr", self.lr)
        checks.number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.frame_size is not None and (len(self.frame_size) != 2 or min(self.frame_size) < 1):
            raise ValueError(f"frame_size must be (H, W) positive, got {self.frame_size!r}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict of WorldModelConfig fields, got {self.model_overrides!r}")
        unknown = sorted(set(self.model_overrides) - {f.name for f in dataclasses.fields(WorldModelConfig)})
        if unknown:
            raise ValueError(f"model_overrides has keys that are not WorldModelConfig fields: {unknown}")
        if bool(self.data) == bool(self.episodes):
            raise ValueError("give exactly one of data (a token cache) and episodes (with tokenizer)")
        if self.episodes and not self.tokenizer:
            raise ValueError("episodes needs tokenizer: the FrameTokenizer or CompressiveTokenizer checkpoint that "
                             "codes the frames")
        if self.stop_at_step > self.steps:
            raise ValueError(f"stop_at_step ({self.stop_at_step}) must be at most steps ({self.steps})")

    def check_inputs(self) -> None:
        """The files a run reads must exist (``rlvrw.usage``'s one-line errors), and ``out_dir`` be no file."""
        if self.data:
            check_token_cache("data", self.data)
        else:
            usage.existing_dir("episodes", self.episodes, "a directory of episode .npz files", "*.npz")
            usage.existing_file("tokenizer", self.tokenizer, "a tokenizer checkpoint from `rlvrw tokenizer`")
        if self.init_from:
            check_model_dir("init_from", self.init_from)
        usage.output_dir("out_dir", self.out_dir)



# ----------------------------------------------------------------------------------------------------------------------
# Building the run
# ----------------------------------------------------------------------------------------------------------------------


def build_world_model(config: PretrainConfig, layout: SequenceLayout) -> WorldModelTransformer:
    """The model to train: ``init_from``'s weights, or a fresh one of the configured size and the layout's vocab."""
    if config.init_from:
        model = checkpoint.load_model(config.init_from, "init_from", attention_backend=config.attention_backend)
    else:
        sizes = dict(vocab_size=layout.vocab_size, max_position_embeddings=max(layout.seq_len, 8192))
        if getattr(config, "copy_prior", False):  # rlvrw rl's fresh models have none
            sizes["copy_prior_offset"] = layout.copy_offset
        sizes.update(config.model_overrides)
        model_config = WorldModelConfig.small(**sizes) if config.model == "small" else WorldModelConfig(**sizes)
        model = WorldModelTransformer(model_config, attention_backend=config.attention_backend)
    if model.config.vocab_size < layout.vocab_size or model.config.max_position_embeddings < layout.seq_len:
        raise UsageError(f"the model (vocab {model.config.vocab_size}, {model.config.max_position_embeddings} "
                         f"positions) cannot read the layout's sequences (vocab {layout.vocab_size}, "
                         f"{layout.seq_len} tokens)")
    return model


def make_optimizer(model: nn.Module, config: PretrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm weights (vectors)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning rate of ``step`` (0-based) over the peak: linear warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, config: PretrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = functools.partial(lr_factor, warmup_steps=config.warmup_steps, total_steps=config.steps,
                                 min_ratio=config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device`` (None: plain fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def training_flops_per_sequence(model_config: WorldModelConfig, layout: SequenceLayout) -> int:
    """Model FLOPs of forward + backward of one sequence as trained here: 6 x the matmul parameters per input token
    (the output layer only at the loss positions), plus causal attention, 6 x layers x width x T^2 (half of the
    non-causal 12). Backward recomputation is not counted (MFU's convention)."""
    hidden, vocab = model_config.hidden_size, model_config.vocab_size
    attention_width = model_config.num_attention_heads * model_config.head_dim
    kv_width = model_config.num_key_value_heads * model_config.head_dim
    per_layer = hidden * (2 * attention_width + 2 * kv_width) + 3 * hidden * model_config.intermediate_size
    tokens = layout.seq_len - 1
    loss_tokens = int(layout.tables().loss_mask.sum())
    body = 6 * model_config.num_hidden_layers * per_layer * tokens
    head = 6 * hidden * vocab * loss_tokens
    attention = 6 * model_config.num_hidden_layers * attention_width * tokens * tokens
    return body + head + attention


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s when it is a GPU listed in ``PEAK_BF16_FLOPS``, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def value_checks_off_on_gpu(device: torch.device):
    """On a GPU, turn off the ops' checks of tensor values within the context: the cache's ids were range-checked
    once when it loaded, and checking every micro-batch again would sync with the GPU each time."""
    if device.type != "cuda":
        yield
        return
    previous = checks.value_checks_enabled(torch.empty(0))
    ops.set_value_checks(False)
    try:
        yield
    finally:
        ops.set_value_checks(previous)


def train_step(
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    micro_batches: list[torch.Tensor],
    global_loss_tokens: int,
    grad_clip: float,
    dtype: torch.dtype | None,
    world_size: int,
    guard: NonFiniteGuard | None = None,
    step: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches of whole sequences; returns (this rank's summed NLL,
    the gradient norm before clipping), 0-d tensors on the device (no host sync).

    Each micro-batch's summed NLL is divided by ``global_loss_tokens`` (all ranks, all micro-batches) and multiplied
    by ``world_size``, which undoes the data-parallel averaging: the gradient is that of the global mean. With a
    ``guard`` (``rlvrw.guard``), the update of a step whose loss or gradient norm is not finite is not applied.
    """
    device = micro_batches[0].device
    scale = world_size / global_loss_tokens
    nll_sum = torch.zeros((), device=device)
    for index, ids in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with distributed.gradient_sync(wrapped, last):
            with autocast:
                nll = wrapped(ids)
            (nll * scale).backward()
        nll_sum += nll.detach().float()
    grad_norm = nn.utils.clip_grad_norm_(wrapped.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    if guard is None:
        optimizer.step()
    else:
        guard.step(optimizer, step, loss=nll_sum, grad_norm=grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return nll_sum, grad_norm


def prepare_token_cache(config: PretrainConfig, context: distributed.DistributedContext) -> Path:
    """The token cache to train on: ``config.data``, or ``OUT/tokens.npz`` tokenized from ``config.episodes`` by rank 0
    (once: an existing one is reused) while the other ranks wait: frame by frame with a ``FrameTokenizer``, as
    multi-step clips with a ``CompressiveTokenizer``."""
    if config.data:
        return Path(config.data)
    cache_path = Path(config.out_dir) / CACHE_FILE
    if context.is_main and not cache_path.is_file():
        from rlvrw.models.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer).to(context.device)
        episodes = episode_stream(config.episodes, config.frame_size, action_bins=config.action_bins)
        if isinstance(tokenizer, CompressiveTokenizer):
            summary = tokenize_clips(tokenizer, episodes, cache_path, context_frames=config.context_frames,
                                     predicted_frames=config.predicted_frames, frame_skip=config.frame_skip,
                                     clip_stride=config.clip_stride, progress=config.progress)
            logger.info("tokenized %(clips)d clips of %(episodes)d episodes (%(skipped)d skipped) into %(path)s",
                        summary)
        else:
            summary = tokenize_episodes(tokenizer, episodes, cache_path, progress=config.progress)
            logger.info("tokenized %(episodes)d episodes (%(frames)d frames, %(skipped)d skipped) into %(path)s",
                        summary)
    distributed.barrier()
    return cache_path


def episode_stream(root: str | Path, frame_size: tuple[int, int] | None = None, split: str = "train",
                   action_bins: int = NUM_BINS):
    """(frames (T, H, W, 3) uint8, action_bins (T, A)) of every readable episode of ``split`` in an episode
    directory (``rlvrw.data.rt1``'s format), actions cut into ``action_bins`` bins per dimension with the data set's
    statistics; unreadable files, episodes without actions and those of another action width are logged, skipped and
    counted."""
    from rlvrw.data import rt1
    from rlvrw.data.actions import ActionDiscretizer

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


def pretrain(config: PretrainConfig) -> dict:
    """Train (or continue training) the world model as ``config`` says; see the module doc. Under torchrun every
    process calls this. Returns a summary: {"step", "loss", "tokens_per_s", "checkpoint", "model_dir",
    "nonfinite_skipped"}."""
    config.check_inputs()
    joined_here = not dist.is_initialized()
    context = distributed.setup(config.device)
    try:
        return _train(config, context)
    finally:
        if joined_here:
            distributed.teardown()


def _train(config: PretrainConfig, context: distributed.DistributedContext) -> dict:
    out_dir = Path(config.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    cache = load_token_cache(prepare_token_cache(config, context))
    layout = layout_for_cache(cache, config.context_frames, config.codebook_size, config.action_bins)
    # the clips of a multi-step cache tokenized here were cut with frame_skip already: a row's frames are consecutive
    row_skip = 1 if config.episodes and cache.context_ids is not None else config.frame_skip
    sampler = ClipSampler(cache, layout, row_skip, config.seed)

    torch.manual_seed(config.seed)
    world_model = build_world_model(config, layout).to(context.device)
    if config.compile:
        for layer in world_model.model.layers:
            layer.compile()
    dtype = autocast_dtype(config.precision, context.device)
    loss_module = NextTokenLoss(world_model, layout).to(context.device)
    wrapped = distributed.wrap_model(loss_module, context, config.parallel, shard_units=world_model.model.layers,
                                     param_dtype=dtype)
    fused = context.device.type == "cuda" and not (context.distributed and config.parallel == "fsdp")
    optimizer = make_optimizer(world_model, config, fused)
    scheduler = make_scheduler(optimizer, config)

    start_step, found = checkpoint.start_or_resume(checkpoint_dir, out_dir, config, world_model, optimizer, scheduler,
                                                   context.is_main)
    end_step = config.stop_at_step or config.steps
    guard = NonFiniteGuard(config.on_nonfinite, "pretrain", skipped=checkpoint.skipped_steps(found))

    global_batch = config.micro_batch_size * config.grad_accum_steps * context.world_size
    loss_tokens_per_sequence = int(layout.tables().loss_mask.sum())
    global_loss_tokens = global_batch * loss_tokens_per_sequence
    tokens_per_step = global_batch * (layout.seq_len - 1)
    flops_per_step = global_batch * training_flops_per_sequence(world_model.config, layout)
    peak = peak_flops(context.device) if dtype == torch.bfloat16 else None
    rank_rows = config.micro_batch_size * config.grad_accum_steps
    first_row = context.rank * rank_rows

    run_log = RunLogger(out_dir, total_steps=end_step, start_step=start_step, tensorboard=config.tensorboard,
                        progress=config.progress, progress_keys=("loss", "lr", "tokens_per_s"))
    run_log.message(f"pretrain: {world_model.num_parameters():,} parameters, {layout.mode} sequences of "
                    f"{layout.seq_len} tokens, global batch {global_batch}, steps {start_step} -> {end_step}"
                    + (f" (resumed from {found})" if found is not None else ""))
    summary = {"step": start_step, "loss": None, "tokens_per_s": None, "checkpoint": str(found) if found else None}
    nll_since_log = torch.zeros((), device=context.device)
    steps_since_log, log_start = 0, time.perf_counter()
    with contextlib.closing(run_log), value_checks_off_on_gpu(context.device):
        for step in range(start_step, end_step):
            micro_batches = [
                sampler.sequences(step, global_batch, slice(row, row + config.micro_batch_size)).to(context.device)
                for row in range(first_row, first_row + rank_rows, config.micro_batch_size)
            ]
            lr = scheduler.get_last_lr()[0]
            done = step + 1
            nll, grad_norm = train_step(wrapped, optimizer, scheduler, micro_batches, global_loss_tokens,
                                        config.grad_clip, dtype, context.world_size, guard, done)
            nll_since_log += nll
            steps_since_log += 1
            if done % config.log_every == 0 or done == end_step:
                guard.check()  # before the loss is read: a stopped run logs no non-finite loss
                loss = distributed.all_reduce_sum(nll_since_log).item() / (global_loss_tokens * steps_since_log)
                elapsed = time.perf_counter() - log_start  # after the .item() above: the device has finished
                metrics = {
                    "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                    "tokens_per_s": tokens_per_step * steps_since_log / elapsed,
                    "step_time_s": elapsed / steps_since_log, "tokens": done * tokens_per_step,
                    "nonfinite_skipped": guard.skipped,
                }
                if peak is not None:
                    metrics["mfu"] = flops_per_step * steps_since_log / elapsed / peak
                run_log.log(done, metrics)
                summary.update(step=done, loss=loss, tokens_per_s=metrics["tokens_per_s"])
                nll_since_log = torch.zeros((), device=context.device)
                steps_since_log, log_start = 0, time.perf_counter()
            if done % config.save_every == 0 or done == end_step:
                state = {"config": config.to_dict(), "data": {"seed": config.seed, "next_step": done,
                                                              "sequences_seen": done * global_batch},
                         "tokens": done * tokens_per_step, "nonfinite_skipped": guard.check()}
                path = checkpoint.save_checkpoint(checkpoint_dir, done, world_model, optimizer, scheduler, state,
                                                  keep_last=config.keep_checkpoints)
                summary["checkpoint"] = str(path)
            run_log.advance()
    summary["nonfinite_skipped"] = guard.check()
    if end_step == config.steps:
        summary["model_dir"] = str(checkpoint.save_model(out_dir / "model", world_model))
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _run(config: PretrainConfig) -> int:
    print_summary(pretrain(config))
    return 0


add_cli, main = config_command("pretrain", "MLE pre-training of the world model on token sequences", __doc__,
                               PretrainConfig, _run)

if __name__ == "__main__":
    raise SystemExit(main())
