"""The FSQ bottleneck as a module: optional in/out projections, channel-first or channel-last input, and codebook usage
counted on the device.

Drop-in for vector-quantize-pytorch's ``FSQ(levels, dim, channel_first=...)`` with one codebook: ``forward`` returns
``(out, indices)`` with the same values (quantization in float32 for half inputs, codes back in the input's dtype).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rlvrw import checks, ops
from rlvrw.ops.fsq import check_levels
from rlvrw.reference.fsq import codebook_size


class FSQ(nn.Module):
    """levels: per-dimension level counts (d = len(levels)); dim: the feature size around the bottleneck (default d:
    no projections; otherwise ``project_in`` dim -> d and ``project_out`` d -> dim, linear layers, bias optional).
    channel_first: inputs are (B, dim, *) instead of (..., dim). track_usage: count how often each code is used
    (buffer ``code_counts``, updated on the device without a host sync; see ``usage``).

    In training (gradients needed) the output is ``project_out(codes)`` with straight-through gradients to the input;
    without gradients it is ``fsq_dequantize`` (a table gather, equal up to float rounding). ``decode(indices)`` maps
    indices to the output directly.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        *,
        channel_first: bool = False,
        projection_has_bias: bool = True,
        track_usage: bool = True,
    ):
        super().__init__()
        self.levels = check_levels(levels)
        self.codebook_dim = len(self.levels)
        self.codebook_size = codebook_size(self.levels)
        self.dim = self.codebook_dim if dim is None else checks.integer("dim", dim)
        self.channel_first = channel_first
        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = self.project_out = None
        self.track_usage = track_usage
        self.register_buffer("code_counts", torch.zeros(self.codebook_size, dtype=torch.int64), persistent=False)

    def _to_channel_last(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.channel_first:
            if x.dim() < 2:
                raise ValueError(f"{name} must be (B, {self.dim}, ...) (channel_first=True), got {tuple(x.shape)}")
            x = x.movedim(1, -1)
        if x.shape[-1] != self.dim:
            where = "dim 1" if self.channel_first else "the last dim"
            raise ValueError(f"{name} must have {self.dim} features in {where}, got shape {tuple(x.shape)}")
        return x

    def _from_channel_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, 1) if self.channel_first else x

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (..., d) channel-last, indices) of an input in the module's layout, before ``project_out``."""
        z = self._to_channel_last(z, "z")
        if self.project_in is not None:
            z = self.project_in(z)
        codes, indices = ops.fsq_quantize(z, self.levels)
        if self.track_usage:
            self._count(indices)
        return codes, indices

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., dim) or (B, dim, *) -> (out in z's layout and dtype, indices (...,) / (B, *) int32)."""
        codes, indices = self.quantize(z)
        if self.project_out is None:
            return self._from_channel_last(codes), indices
        if torch.is_grad_enabled() and (codes.requires_grad or self.project_out.weight.requires_grad):
            out = self.project_out(codes)
        else:
            out = ops.fsq_dequantize(indices, self.levels, self.project_out.weight, self.project_out.bias)
        return self._from_channel_last(out), indices

    def decode(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """indices (...,) -> the output ``forward`` gives for them, in the module's layout: ``project_out(codes)`` as a
        table gather, or the codes themselves (in ``dtype``, default float32) without projections."""
        if self.project_out is None:
            codes = ops.fsq_indices_to_codes(indices, self.levels, dtype or torch.float32)
            return self._from_channel_last(codes)
        out = ops.fsq_dequantize(indices, self.levels, self.project_out.weight, self.project_out.bias)
        return self._from_channel_last(out if dtype is None else out.to(dtype))

    def indices_to_codes(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """indices (...,) -> codes (..., d), channel-last, before any projection."""
        return ops.fsq_indices_to_codes(indices, self.levels, dtype)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., d), channel-last -> indices (...,)."""
        return ops.fsq_codes_to_indices(codes, self.levels)

    # Codebook usage ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _count(self, indices: torch.Tensor) -> None:
        flat = indices.reshape(-1).long()
        # index_add_ into a known size: unlike bincount it does not read the data to size its output (no host sync).
        # Index -1 (a NaN input, when value checks are off) counts nothing rather than writing out of bounds.
        self.code_counts.index_add_(0, flat.clamp(min=0), (flat >= 0).long())

    @torch.no_grad()
    def usage(self) -> dict[str, torch.Tensor]:
        """Device 0-d tensors over everything counted since the last ``reset_usage``: ``used_fraction`` (codes seen at
        least once / codebook size), ``perplexity`` (exp of the entropy of the code frequencies: the effective number
        of codes in use) and ``total`` (tokens counted)."""
        counts = self.code_counts
        total = counts.sum()
        p = counts.double() / total.clamp(min=1)
        entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum()
        return {
            "used_fraction": (counts > 0).double().mean(),
            "perplexity": entropy.exp(),
            "total": total,
        }

    def reset_usage(self) -> None:
        self.code_counts.zero_()

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"channel_first={self.channel_first}"
        )
