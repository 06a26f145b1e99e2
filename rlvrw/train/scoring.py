"""Scoring token sequences under the world model, one path for MLE pre-training (``NextTokenLoss``) and GRPO
(``SampledTokenLogprobs``): the transformer's last hidden states at the positions before the scored tokens, then the
output layer (all of it, or only the rows of the ids the sampler may draw) through ``ops.linear_token_logprobs``, in
the autocast dtype when autocast is on, so the (tokens, vocabulary) logits are never held whole.

Both are the modules that DDP (and FSDP2, for pre-training) wrap, so that the output layer is used inside a forward
pass (where FSDP2 has gathered it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import rlvrw.ops as ops
from rlvrw.data.sequences import SequenceLayout
from rlvrw.models.transformer import WorldModelTransformer


def scored_positions(layout: SequenceLayout) -> torch.Tensor:
    """The positions (L,) of the tokens a sequence of ``layout`` is scored on (its loss mask; never position 0,
    which nothing predicts)."""
    return layout.tables().loss_mask[1:].nonzero().squeeze(1) + 1


def world_model_logprobs(world_model: WorldModelTransformer, ids: torch.Tensor, target_positions: torch.Tensor,
                   id_range: tuple[int, int] | None = None, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probs (n, L) of the tokens of whole sequences ``ids`` (n, seq_len) at ``target_positions`` (L,) under
    softmax(logits / temperature) over the whole vocabulary, or over the ids [low, high) of ``id_range``; with
    ``return_entropy``, also that distribution's entropies (n, L)."""
    # output position t predicts token t+1; index_select, not advanced indexing: its backward (index_add_) never
    # waits on the host
    hidden = world_model(ids[:, :-1], return_logits=False).index_select(1, target_positions - 1)
    tokens = ids.index_select(1, target_positions)
    weight = world_model.lm_head.weight
    if id_range is not None:
        tokens, weight = tokens - id_range[0], weight[id_range[0] : id_range[1]]
    device_type = ids.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    return ops.linear_token_logprobs(hidden.to(dtype), weight.to(dtype), tokens, temperature,
                                     return_entropy=return_entropy)


class NextTokenLoss(nn.Module):
    """The summed negative log-likelihood of the predicted frame tokens of whole sequences (B, L) under
    ``world_model`` (MLE pre-training)."""

    def __init__(self, world_model: WorldModelTransformer, layout: SequenceLayout):
        super().__init__()
        self.world_model = world_model
        self.register_buffer("target_positions", scored_positions(layout), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return -world_model_logprobs(self.world_model, ids, self.target_positions).sum()


def sampled_token_range(layout: SequenceLayout) -> tuple[int, int]:
    """The legal id range [low, high) shared by every sampled position of ``layout`` (its frame codebook)."""
    tables = layout.tables()
    lows, highs = set(tables.low[tables.loss_mask].tolist()), set(tables.high[tables.loss_mask].tolist())
    if len(lows) != 1 or len(highs) != 1:
        raise ValueError(f"layout's sampled positions must share one legal id range, got lows {sorted(lows)} and "
                         f"highs {sorted(highs)}")
    return lows.pop(), highs.pop()


class SampledTokenLogprobs(nn.Module):
    """Log-probs and entropies (n, L) of the L sampled tokens of whole sequences (n, seq_len) under the distribution
    the sampler draws from: softmax(logits / temperature) over the legal ids (the frame codebook rows of the output
    layer)."""

    def __init__(self, world_model: WorldModelTransformer, layout: SequenceLayout, temperature: float = 1.0):
        super().__init__()
        self.world_model, self.temperature = world_model, float(temperature)
        self.id_range = sampled_token_range(layout)
        targets = scored_positions(layout)
        self.register_buffer("target_positions", targets, persistent=False)
        self.num_tokens = targets.numel()
        self.response_positions = targets - layout.prompt_len  # (L,) on the CPU: index of a Rollout's (n, R) tensors

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return world_model_logprobs(self.world_model, ids, self.target_positions, self.id_range, self.temperature,
                              return_entropy=True)
