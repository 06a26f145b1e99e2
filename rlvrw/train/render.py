"""What the reward and the logs see of token sequences: the frames they predict, decoded by the frozen tokenizer
(``FrameRenderer``), the L1 of predicted frames against their group's true frames, and the repetition rate (a
predicted frame whose tokens all equal the previous frame's). Used by the RL trainer and by evaluation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from rlvrw.data.sequences import SequenceLayout
from rlvrw.usage import UsageError


class FrameRenderer:
    """The frames that whole sequences (n, seq_len) predict, in [0, 1], float32, through the tokenizer's fast
    decoder (FSQ table gather + 1x1 conv in one op, ``dtype`` channels_last, fused GroupNorm + SiLU): single-step
    (n, 3, H, W) from a ``FrameTokenizer`` and ``token_grid``; multi-step (n, K, 3, H, W) from a
    ``CompressiveTokenizer``, whose grids are its own."""

    def __init__(self, tokenizer: nn.Module, layout: SequenceLayout, token_grid: tuple[int, int] | None = None,
                 dtype: torch.dtype = torch.float32):
        self.tokenizer, self.layout, self.dtype = tokenizer, layout, dtype
        if not hasattr(tokenizer, "decode_fast") or not hasattr(tokenizer, "codebook_size"):
            raise UsageError("tokenizer must be a FrameTokenizer or CompressiveTokenizer, got "
                             f"{type(tokenizer).__name__}")
        if tokenizer.codebook_size != layout.codebook_size:
            raise UsageError(f"tokenizer's codebook ({tokenizer.codebook_size} codes) differs from the layout's "
                             f"({layout.codebook_size})")
        if layout.multi:
            if not hasattr(tokenizer, "future_grid"):
                raise UsageError("a multi-step layout needs a CompressiveTokenizer (context and future grids)")
            self.context_grid, self.grid = tuple(tokenizer.context_grid), tuple(tokenizer.future_grid)
            if self.context_grid[0] * self.context_grid[1] != layout.context_tokens:
                raise UsageError(f"tokenizer's context grid {self.context_grid} does not hold the layout's "
                                 f"{layout.context_tokens} context tokens")
        else:
            if hasattr(tokenizer, "future_grid"):
                raise UsageError("a single-step layout needs a FrameTokenizer")
            side = math.isqrt(layout.frame_tokens)
            if token_grid is None and side * side != layout.frame_tokens:
                raise UsageError(f"token_grid is required: {layout.frame_tokens} tokens per frame is not a square")
            self.grid = tuple(token_grid) if token_grid is not None else (side, side)
        if self.grid[0] * self.grid[1] != layout.frame_tokens:
            raise UsageError(f"token grid {self.grid} does not hold the layout's {layout.frame_tokens} frame tokens")

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        frames = layout.response_frames(ids[:, layout.prompt_len :])  # (n, K, N)
        if not layout.multi:
            return self.tokenizer.decode_fast(frames[:, 0].unflatten(1, self.grid), dtype=self.dtype)
        context = (ids[:, : layout.context_tokens] - layout.context_offset).unflatten(1, self.context_grid)
        return self.tokenizer.decode_fast(context, frames.unflatten(2, self.grid), dtype=self.dtype)[1]


def mean_abs_error(predicted: torch.Tensor, truth: torch.Tensor, group_size: int) -> torch.Tensor:
    """The reward's L1 term per sample (n,): mean |prediction - its group's true frames| over frames and pixels."""
    difference = predicted.unflatten(0, (-1, group_size)) - truth[:, None]
    return difference.abs().flatten(2).mean(dim=2).flatten()


def repeated_frames(layout: SequenceLayout, ids: torch.Tensor) -> torch.Tensor:
    """Per sequence (n,), the fraction of predicted frames whose tokens all equal the previous frame's (the last
    context frame before the first prediction): DESIGN.md's repetition."""
    previous = layout.prompt_frames(ids[:, : layout.prompt_len])[:, -1:]
    frames = torch.cat([previous, layout.response_frames(ids[:, layout.prompt_len :])], dim=1)
    return (frames[:, 1:] == frames[:, :-1]).all(dim=2).float().mean(dim=1)
