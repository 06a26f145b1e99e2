"""The ids the world model's learned copy prior looks up (``WorldModelConfig.copy_prior_offset``).

With offset k, the input at position q also embeds the id at position q + 1 - k: for a frame token, the id at the
same place in the previous frame as the token it predicts (``SequenceLayout.copy_offset`` gives k for a layout).
Where that position is before the sequence's start the id is -1: nothing is added.
"""

from __future__ import annotations

import torch


def sequence_copy_ids(ids: torch.Tensor, offset: int) -> torch.Tensor:
    """The copy prior's ids (B, T) for whole sequences ids (B, T) from position 0: ids shifted right by offset - 1."""
    shift = min(offset - 1, ids.shape[1])
    return torch.cat([ids.new_full((ids.shape[0], shift), -1), ids[:, : ids.shape[1] - shift]], dim=1)


def decode_copy_ids(id_cache: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, offset: int) -> torch.Tensor:
    """Write ``tokens`` (n,) at position ``pos`` (a (1,) tensor) of ``id_cache`` (>= n, max_len) and return the copy
    prior's ids (n, 1) of that position. Static shapes, no host sync: a CUDA graph can capture it."""
    rows = id_cache[: tokens.shape[0]]
    rows.index_copy_(1, pos, tokens[:, None])
    source = pos + 1 - offset
    return rows.index_select(1, source.clamp(min=0)).masked_fill(source < 0, -1)
