"""The CNN the video tokenizers are built from: the diffusers VAE layout, and its blocks.

``VAEEncoder`` turns frames into latents and ``VAEDecoder`` latents into frames: stages of ResNet blocks (GroupNorm,
eps 1e-6, then SiLU, then a 3x3 conv, twice) with a stride-2 conv at the end of every encoder stage but the last and
a nearest-neighbour 2x upsample + conv at the end of every decoder stage but the last, a middle block of ResNet +
single-head self-attention + ResNet, and GroupNorm + SiLU + conv at the ends. Given ``cross_attention``, the coarse
stages attend to a context frame's features (``CrossAttentionBlock``: the compressive tokenizer's future frames).
Attribute names are what checkpoint keys are made of (``rlvrw.models.tokenizer_files`` maps the reference's onto them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rlvrw import ops

NORM_EPS = 1e-6  # GroupNorm eps of the VAE blocks
CROSS_ATTENTION_NORM_EPS = 1e-5  # the reference's cross-attention blocks use nn.GroupNorm's default


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """SiLU(GroupNorm(x)): the fused op on the fast path, the two torch modules on the plain path."""
    if fused:
        return ops.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(norm(x))


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), with a 1x1 conv on the skip path when the channels change."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x, fused))
        h = self.conv2(norm_silu(self.norm2, h, fused))
        return self.shortcut(x) + h


class VAEAttention(nn.Module):
    """Multi-head attention of query tokens (B, Lq, C) over key/value tokens (B, Lk, C), with biased projections."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads must divide channels ({channels}), got {num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        def heads(t):  # (B, L, C) -> (B, heads, L, C / heads)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = heads(self.to_q(queries)), heads(self.to_k(keys_values)), heads(self.to_v(keys_values))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view for channels_last input."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) shaped like ``like``; a view (channels_last memory) for contiguous tokens."""
    return tokens.transpose(1, 2).unflatten(2, like.shape[2:])


class SelfAttentionBlock(nn.Module):
    """x + attention of every position over every position of the same frame, after a GroupNorm (no activation)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=NORM_EPS)
        self.attention = VAEAttention(channels, num_heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = to_tokens(self.norm(x))
        return x + from_tokens(self.attention(tokens, tokens), x)


class CrossAttentionBlock(nn.Module):
    """SiLU(z + attention of z's positions over the context frame's features at the same stage).

    Queries and keys get learned position embeddings (zero at start), so the block needs the stage's (h, w). The
    batch of ``z`` is B * T future frames whose context is ``context`` (B, ...): the T frames' queries are laid side
    by side into one sequence per context frame (attention rows are independent, so this is exact), which attends to
    the context once instead of copying it T times.
    """

    def __init__(self, channels: int, size: tuple[int, int], num_groups: int, num_heads: int):
        super().__init__()
        positions = size[0] * size[1]
        self.q_norm = nn.GroupNorm(num_groups, channels, eps=CROSS_ATTENTION_NORM_EPS)
        self.kv_norm = nn.GroupNorm(num_groups, channels, eps=CROSS_ATTENTION_NORM_EPS)
        self.q_pos = nn.Parameter(torch.zeros(positions, channels))
        self.kv_pos = nn.Parameter(torch.zeros(positions, channels))
        self.attention = VAEAttention(channels, num_heads)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = context.shape[0]
        queries = (to_tokens(self.q_norm(z)) + self.q_pos).reshape(batch, -1, z.shape[1])
        keys_values = to_tokens(self.kv_norm(context)) + self.kv_pos
        out = self.attention(queries, keys_values).reshape(z.shape[0], -1, z.shape[1])
        return F.silu(z + from_tokens(out, z))


class MidBlock(nn.Module):
    """ResNet, self-attention, ResNet at the coarsest resolution."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.resnet1 = ResnetBlock(channels, channels, num_groups)
        self.attention = SelfAttentionBlock(channels, num_groups)
        self.resnet2 = ResnetBlock(channels, channels, num_groups)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return self.resnet2(self.attention(self.resnet1(x, fused)), fused)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding one zero row and column at the bottom and right."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEStage(nn.Module):
    """ResNet blocks at one resolution, then a resampling layer (or none, for the last stage)."""

    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, num_groups: int, resample: type | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups) for i in range(num_resnets)
        )
        self.resample = resample(out_channels) if resample is not None else None

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, fused)
        return self.resample(x) if self.resample is not None else x


# ----------------------------------------------------------------------------------------------------------------------
# The encoder and the decoder
# ----------------------------------------------------------------------------------------------------------------------


def stage_sizes(size: tuple[int, int], num_stages: int, grow: bool) -> list[tuple[int, int]]:
    """The (h, w) after each stage: halved (encoder) or doubled (decoder) by every stage but the last."""
    factor = 2 if grow else 0.5
    h, w, sizes = size[0], size[1], []
    for i in range(num_stages):
        if i < num_stages - 1:
            h, w = int(h * factor), int(w * factor)
        sizes.append((h, w))
    return sizes


class VAEEncoder(nn.Module):
    """Frames (N, 3, H, W) -> latents (N, latent_channels, H / 2^(S-1), W / 2^(S-1)) for S = len(channels) stages.

    With ``cross_attention`` = (frame_size, num_heads, max_side), a ``CrossAttentionBlock`` follows every stage whose
    output is at most ``max_side`` on each side; ``forward`` then needs the context frame's stage features.
    """

    def __init__(self, channels: Sequence[int], layers_per_block: int, latent_channels: int, num_groups: int,
                 cross_attention: tuple[tuple[int, int], int, int] | None = None):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        last = len(channels) - 1
        self.stages = nn.ModuleList(
            VAEStage(channels[max(i - 1, 0)], c, layers_per_block, num_groups, Downsample if i < last else None)
            for i, c in enumerate(channels)
        )
        self.cross_attentions = nn.ModuleDict()
        if cross_attention is not None:
            frame_size, num_heads, max_side = cross_attention
            for i, size in enumerate(stage_sizes(frame_size, len(channels), grow=False)):
                if max(size) <= max_side:
                    self.cross_attentions[str(i)] = CrossAttentionBlock(channels[i], size, num_groups, num_heads)
        self.mid = MidBlock(channels[-1], num_groups)
        self.norm_out = nn.GroupNorm(num_groups, channels[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], latent_channels, 3, padding=1)

    def forward(self, frames: torch.Tensor, context_features: list[torch.Tensor] | None = None,
                return_features: bool = False):
        """Latents; with ``return_features``, also the output of every stage (what a future frame attends to)."""
        x = self.conv_in(frames)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if str(i) in self.cross_attentions:
                x = self.cross_attentions[str(i)](x, context_features[i])
            features.append(x)
        latents = self.conv_out(norm_silu(self.norm_out, self.mid(x), fused=False))
        return (latents, features) if return_features else latents


class VAEDecoder(nn.Module):
    """Latents (N, latent_channels, h, w) -> frames (N, 3, h * 2^(S-1), w * 2^(S-1)), unclamped.

    Stages run from the widest channels to the narrowest, with one ResNet more per stage than the encoder. With
    ``cross_attention`` = (latent_size, num_heads, max_side), a ``CrossAttentionBlock`` follows the middle block and
    every stage whose output is at most ``max_side`` on each side; keys "mid" and the stage index.
    """

    def __init__(self, channels: Sequence[int], layers_per_block: int, latent_channels: int, num_groups: int,
                 cross_attention: tuple[tuple[int, int], int, int] | None = None):
        super().__init__()
        widest_first = list(reversed(channels))
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(latent_channels, widest_first[0], 3, padding=1)
        self.mid = MidBlock(widest_first[0], num_groups)
        self.stages = nn.ModuleList(
            VAEStage(widest_first[max(i - 1, 0)], c, layers_per_block + 1, num_groups, Upsample if i < last else None)
            for i, c in enumerate(widest_first)
        )
        self.cross_attentions = nn.ModuleDict()
        if cross_attention is not None:
            latent_size, num_heads, max_side = cross_attention
            sizes = {"mid": latent_size}
            sizes.update((str(i), s) for i, s in enumerate(stage_sizes(latent_size, len(channels), grow=True)))
            widths = {"mid": widest_first[0], **{str(i): c for i, c in enumerate(widest_first)}}
            for key, size in sizes.items():
                if max(size) <= max_side:
                    self.cross_attentions[key] = CrossAttentionBlock(widths[key], size, num_groups, num_heads)
        self.norm_out = nn.GroupNorm(num_groups, channels[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, latents: torch.Tensor, context_features: dict[str, torch.Tensor] | None = None,
                return_features: bool = False, fused: bool = False):
        """Frames; with ``return_features``, also a dict of the outputs of the middle block and of every stage."""
        x = self.mid(self.conv_in(latents), fused)
        features = {"mid": x}
        if "mid" in self.cross_attentions:
            x = self.cross_attentions["mid"](x, context_features["mid"])
        for i, stage in enumerate(self.stages):
            x = stage(x, fused)
            if str(i) in self.cross_attentions:
                x = self.cross_attentions[str(i)](x, context_features[str(i)])
            features[str(i)] = x
        frames = self.conv_out(norm_silu(self.norm_out, x, fused))
        return (frames, features) if return_features else frames
