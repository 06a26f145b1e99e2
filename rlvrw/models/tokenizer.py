"""The two video tokenizers of RLVR-World: frames in [0, 1] <-> discrete FSQ token ids.

``FrameTokenizer`` (the paper's single-step tokenizer; ``CNNFSQModel256`` in the reference code) codes every frame on
its own: a CNN encoder shrinks a 256x320 frame 16x to a 16x20 grid of 64-channel latents, a 1x1 conv maps each latent
to 5 numbers, FSQ with levels [7, 5, 5, 5, 5] rounds them to one of 4375 codes, and the decoder mirrors the encoder.

``CompressiveTokenizer`` (the multi-step tokenizer) spends its tokens on one context frame, coded like the above but
only 8x down (32x40 = 1280 tokens), and codes each future frame with 80 tokens (8x10): the future frame's encoder and
decoder attend, at their coarse stages, to the context frame's encoder and decoder features, so a future frame's
tokens only need to carry what changed.

The CNN is the diffusers VAE layout: stages of ResNet blocks (GroupNorm, eps 1e-6, then SiLU, then a 3x3 conv, twice)
with a stride-2 conv at the end of every encoder stage but the last and a nearest-neighbour 2x upsample + conv at the
end of every decoder stage but the last, a middle block of ResNet + single-head self-attention + ResNet, and
GroupNorm + SiLU + conv at the ends. ``rlvrw.models.checkpoints`` loads the reference checkpoints into these modules.

The decoder has two paths. ``decode`` is the plain one (float32, NCHW, ``nn.GroupNorm`` then SiLU), used in training
and as the spec. ``FrameTokenizer.decode_fast`` is the one for RL rollouts: the FSQ table gather fused with the 1x1
conv at the input (``ops.fsq_dequantize``), bfloat16 weights and activations in channels_last, fused GroupNorm + SiLU
(``ops.group_norm_silu``), and micro-batches sized from the GPU's free memory, writing into one output on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rlvrw import ops
from rlvrw.ops.fsq import check_levels

FSQ_LEVELS = (7, 5, 5, 5, 5)  # 4375 codes, the reference's fsq_levels=12 (about 2^12)
NORM_EPS = 1e-6  # GroupNorm eps of the VAE blocks
CROSS_ATTENTION_NORM_EPS = 1e-5  # the reference's cross-attention blocks use nn.GroupNorm's default
CPU_FRAMES_PER_BATCH = 16  # decode_fast's micro-batch on CPU, where free memory says little about speed
GPU_MEMORY_FRACTION = 0.5  # share of the free GPU memory decode_fast plans to fill (the rest: allocator slack, cuDNN)
LIVE_ACTIVATIONS = 6  # activations of one stage alive at once in a ResNet block (input, norms, convs, sum)


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


class Attention(nn.Module):
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
        self.attention = Attention(channels, num_heads=1)

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
        self.attention = Attention(channels, num_heads)

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


class Stage(nn.Module):
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
# Encoder and decoder
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


class Encoder(nn.Module):
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
            Stage(channels[max(i - 1, 0)], c, layers_per_block, num_groups, Downsample if i < last else None)
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


class Decoder(nn.Module):
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
            Stage(widest_first[max(i - 1, 0)], c, layers_per_block + 1, num_groups, Upsample if i < last else None)
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


# ----------------------------------------------------------------------------------------------------------------------
# Input checks shared by the tokenizers
# ----------------------------------------------------------------------------------------------------------------------


def check_architecture(channels, layers_per_block, latent_channels, levels, num_groups) -> tuple:
    channels = tuple(int(c) for c in channels)
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must be a non-empty list of positive ints, got {channels!r}")
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}")
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be at least 1, got {latent_channels}")
    if num_groups < 1 or any(c % num_groups for c in channels):
        raise ValueError(f"num_groups must divide every entry of channels {channels}, got {num_groups}")
    return channels, check_levels(list(levels))


def check_frames(name: str, frames: torch.Tensor, factor: int) -> None:
    if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of frames in [0, 1], got {type(frames).__name__}"
                         + (f" of {frames.dtype}" if isinstance(frames, torch.Tensor) else ""))
    if frames.dim() not in (4, 5) or frames.shape[-3] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W) or (B, T, 3, H, W), got {tuple(frames.shape)}")
    if frames.shape[-2] % factor or frames.shape[-1] % factor:
        raise ValueError(f"{name}'s height and width must be multiples of {factor} (the tokenizer's downsampling), "
                         f"got {tuple(frames.shape[-2:])}")


def check_ids(name: str, ids: torch.Tensor, grid: tuple[int, int] | None = None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 or int64 tensor of token ids, got "
                         + (str(ids.dtype) if isinstance(ids, torch.Tensor) else type(ids).__name__))
    if ids.dim() not in (3, 4):
        raise ValueError(f"{name} must have shape (N, h, w) or (B, T, h, w), got {tuple(ids.shape)}")
    if grid is not None and tuple(ids.shape[-2:]) != grid:
        raise ValueError(f"{name} must hold a {grid[0]}x{grid[1]} grid of ids per frame, got {tuple(ids.shape[-2:])}")


def quantize(z: torch.Tensor, levels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """FSQ on channel-first latents (N, d, h, w): (codes (N, d, h, w) with a straight-through gradient, ids (N, h, w)
    int64)."""
    codes, ids = ops.fsq_quantize(z.movedim(1, -1), levels)
    return codes.movedim(-1, 1), ids.long()


def codes_of(ids: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """ids (N, h, w) -> float32 codes (N, d, h, w)."""
    return ops.fsq_indices_to_codes(ids, levels).movedim(-1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# The fast decoder's pieces
# ----------------------------------------------------------------------------------------------------------------------


def check_fast_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")


def cast_weights(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``module``'s parameters in ``dtype``, conv kernels channels_last, for ``functional_call``: one cast per decode
    call (not per micro-batch), and the module itself is left as it is."""
    return {name: p.to(dtype, memory_format=torch.channels_last) if p.dim() == 4 else p.to(dtype)
            for name, p in module.named_parameters()}


def decoder_frames_per_batch(channels: Sequence[int], grid: tuple[int, int], device: torch.device,
                             dtype: torch.dtype) -> int:
    """How many frames a decoder with stage widths ``channels`` decodes at once from ``grid`` latents: on a GPU, what
    fits in ``GPU_MEMORY_FRACTION`` of the free memory, from the largest activation of a stage; on CPU, a fixed
    ``CPU_FRAMES_PER_BATCH``."""
    if device.type != "cuda":
        return CPU_FRAMES_PER_BATCH
    sizes = stage_sizes(grid, len(channels), grow=True)
    inputs = [tuple(grid)] + sizes[:-1]  # a stage's ResNets run at the size it receives, its upsampling at its output
    widest = max(c * max(h_in * w_in, h_out * w_out)
                 for c, (h_in, w_in), (h_out, w_out) in zip(reversed(channels), inputs, sizes))
    bytes_per_frame = LIVE_ACTIVATIONS * widest * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * GPU_MEMORY_FRACTION) // bytes_per_frame)


def dequantize_fast(ids: torch.Tensor, levels: tuple[int, ...], layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """ids (N, h, w) -> ``layer``(codes) as one table gather (``ops.fsq_dequantize``), channel-last (N, h, w, C) in
    ``dtype``. The table is built from the layer's own weights, so it stays cached across calls."""
    return ops.fsq_dequantize(ids, levels, layer.weight, layer.bias).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The per-frame tokenizer
# ----------------------------------------------------------------------------------------------------------------------


class FrameTokenizer(nn.Module):
    """Per-frame CNN-FSQ tokenizer. Defaults: the paper's RT-1 tokenizer (256x320 -> 16x20 = 320 ids in [0, 4375)).

    ``channels`` lists the width of each stage; every stage but the last halves the frame, so frames need H and W
    divisible by ``downsample_factor`` = 2^(len(channels) - 1). A CPU-sized one: ``FrameTokenizer(channels=(32, 64,
    64), num_groups=16, latent_channels=16)`` codes 64x64 frames as 16x16 ids.
    """

    def __init__(self, channels: Sequence[int] = (128, 256, 256, 512, 768), layers_per_block: int = 2,
                 latent_channels: int = 64, levels: Sequence[int] = FSQ_LEVELS, num_groups: int = 32):
        super().__init__()
        self.channels, self.levels = check_architecture(channels, layers_per_block, latent_channels, levels, num_groups)
        self.layers_per_block, self.latent_channels, self.num_groups = layers_per_block, latent_channels, num_groups
        self.encoder = Encoder(self.channels, layers_per_block, latent_channels, num_groups)
        self.quant_in = nn.Conv2d(latent_channels, len(self.levels), 1)
        self.quant_out = nn.Conv2d(len(self.levels), latent_channels, 1)
        self.decoder = Decoder(self.channels, layers_per_block, latent_channels, num_groups)

    @property
    def config(self) -> dict:
        """The constructor's arguments: ``FrameTokenizer(**t.config)`` builds the same architecture."""
        return {"channels": list(self.channels), "layers_per_block": self.layers_per_block,
                "latent_channels": self.latent_channels, "levels": list(self.levels), "num_groups": self.num_groups}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def forward(self, frames: torch.Tensor, return_codes: bool = False):
        """Training pass: frames (N, 3, H, W) in [0, 1] -> (reconstruction (N, 3, H, W), unclamped; ids (N, h, w)),
        and with ``return_codes`` the FSQ codes (N, len(levels), h, w) too. Gradients reach the encoder through FSQ's
        straight-through rounding."""
        check_frames("frames", frames, self.downsample_factor)
        codes, ids = quantize(self.quant_in(self.encoder(frames)), self.levels)
        recon = self.decoder(self.quant_out(codes))
        return (recon, ids, codes) if return_codes else (recon, ids)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, H, W) or (B, T, 3, H, W) in [0, 1] -> ids (N, h, w) or (B, T, h, w), int64."""
        check_frames("frames", frames, self.downsample_factor)
        flat = frames.reshape(-1, *frames.shape[-3:])
        _, ids = quantize(self.quant_in(self.encoder(flat)), self.levels)
        return ids.reshape(*frames.shape[:-3], *ids.shape[-2:])

    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input, plain way: ids (N, h, w) -> codes -> 1x1 conv -> (N, latent_channels, h, w)."""
        return self.quant_out(codes_of(ids, self.levels).to(self.quant_out.weight.dtype))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N, h, w) or (B, T, h, w) -> frames (N, 3, H, W) or (B, T, 3, H, W) in [0, 1]. The plain path: the
        modules' own dtype, NCHW. See ``decode_fast`` for rollouts."""
        check_ids("ids", ids)
        flat = ids.reshape(-1, *ids.shape[-2:])
        frames = self.decoder(self.dequantize(flat)).clamp_(0.0, 1.0)
        return frames.reshape(*ids.shape[:-2], *frames.shape[-3:])

    @torch.no_grad()
    def decode_fast(self, ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                    frames_per_batch: int | None = None) -> torch.Tensor:
        """``decode`` for rollouts: same input and output (float32 frames in [0, 1], on ids' device), computed with
        the FSQ table gather + 1x1 conv in one op, ``dtype`` weights and activations in channels_last, fused
        GroupNorm + SiLU, in micro-batches of ``frames_per_batch`` (default: ``decoder_frames_per_batch``) written
        into one output tensor. No frame goes to the host (the only host read is the ids' range check of
        ``ops.fsq_dequantize``, off under ``ops.set_value_checks(False)``). Matches ``decode`` within ``dtype``'s
        rounding."""
        check_ids("ids", ids)
        check_fast_dtype(dtype)
        if frames_per_batch is not None and frames_per_batch < 1:
            raise ValueError(f"frames_per_batch must be at least 1, got {frames_per_batch}")
        flat = ids.reshape(-1, *ids.shape[-2:])
        factor = self.downsample_factor
        frames = torch.empty(flat.shape[0], 3, flat.shape[1] * factor, flat.shape[2] * factor,
                             device=ids.device, dtype=torch.float32)
        weights = cast_weights(self.decoder, dtype)
        step = frames_per_batch or decoder_frames_per_batch(self.channels, tuple(flat.shape[1:]), ids.device, dtype)
        for start in range(0, flat.shape[0], step):
            # the gather is channel-last, so its NCHW view is already channels_last
            latents = dequantize_fast(flat[start:start + step], self.levels, self.quant_out, dtype).permute(0, 3, 1, 2)
            out = functional_call(self.decoder, weights, (latents,), {"fused": True})
            frames[start:start + step] = out.clamp_(0.0, 1.0)
        return frames.reshape(*ids.shape[:-2], *frames.shape[-3:])


# ----------------------------------------------------------------------------------------------------------------------
# The compressive (multi-step) tokenizer
# ----------------------------------------------------------------------------------------------------------------------


class CompressiveTokenizer(nn.Module):
    """Context frame -> h x w ids (32x40 at the defaults); each future frame -> (h / p) x (w / p) ids (8x10).

    The context frame goes through a plain encoder / decoder (``context_encoder``, ``context_decoder``, FSQ between
    them through 1x1 convs, like ``FrameTokenizer``). A future frame goes through ``future_encoder``, whose coarse
    stages cross-attend to the context encoder's stage outputs; its latents are cut into p x p patches, each patch
    flattened and mapped by a linear layer to one FSQ code; ``future_decoder`` maps codes back to patches and
    decodes them while cross-attending to the context decoder's features. Cross-attention is placed at every stage
    at most ``attention_max_side`` on each side (40: the 32x40 stages), with ``num_heads`` heads. The two codebooks
    are separate (both ``levels``): a world model gives them separate id ranges. One context frame per clip.

    ``frame_size`` is needed at construction (the cross-attention's position embeddings have one row per position).
    A CPU-sized one: ``CompressiveTokenizer(frame_size=(64, 64), channels=(32, 64, 64), num_groups=16,
    latent_channels=16, attention_max_side=16)`` gives 16x16 context ids and 4x4 ids per future frame.
    """

    def __init__(self, frame_size: tuple[int, int] = (256, 320), channels: Sequence[int] = (128, 256, 256, 512),
                 layers_per_block: int = 2, latent_channels: int = 64, levels: Sequence[int] = FSQ_LEVELS,
                 num_groups: int = 32, patch_size: int = 4, num_heads: int = 4, attention_max_side: int = 40):
        super().__init__()
        self.channels, self.levels = check_architecture(channels, layers_per_block, latent_channels, levels, num_groups)
        factor = 2 ** (len(self.channels) - 1)
        if len(frame_size) != 2 or any(s < 1 or s % (factor * patch_size) for s in frame_size):
            raise ValueError(f"frame_size must be (H, W) with both multiples of {factor * patch_size} (the "
                             f"downsampling {factor} times patch_size {patch_size}), got {tuple(frame_size)}")
        if num_heads < 1 or any(c % num_heads for c in self.channels):
            raise ValueError(f"num_heads must divide every entry of channels {self.channels}, got {num_heads}")
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.layers_per_block, self.latent_channels, self.num_groups = layers_per_block, latent_channels, num_groups
        self.patch_size, self.num_heads, self.attention_max_side = patch_size, num_heads, attention_max_side
        self.context_grid = (self.frame_size[0] // factor, self.frame_size[1] // factor)
        self.future_grid = (self.context_grid[0] // patch_size, self.context_grid[1] // patch_size)
        if not any(max(size) <= attention_max_side for size in stage_sizes(self.frame_size, len(self.channels), False)):
            raise ValueError(f"attention_max_side ({attention_max_side}) is smaller than every encoder stage of "
                             f"{self.frame_size} frames, so future frames would never see the context frame")

        d, patch_dim = len(self.levels), latent_channels * patch_size * patch_size
        vae = (self.channels, layers_per_block, latent_channels, num_groups)
        self.context_encoder = Encoder(*vae)
        self.context_quant_in = nn.Conv2d(latent_channels, d, 1)
        self.context_quant_out = nn.Conv2d(d, latent_channels, 1)
        self.context_decoder = Decoder(*vae)
        self.future_encoder = Encoder(*vae, cross_attention=(self.frame_size, num_heads, attention_max_side))
        self.future_quant_in = nn.Linear(patch_dim, d)
        self.future_quant_out = nn.Linear(d, patch_dim)
        self.future_decoder = Decoder(*vae, cross_attention=(self.context_grid, num_heads, attention_max_side))

    @property
    def config(self) -> dict:
        return {"frame_size": list(self.frame_size), "channels": list(self.channels),
                "layers_per_block": self.layers_per_block, "latent_channels": self.latent_channels,
                "levels": list(self.levels), "num_groups": self.num_groups, "patch_size": self.patch_size,
                "num_heads": self.num_heads, "attention_max_side": self.attention_max_side}

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _check_clip(self, context: torch.Tensor, future: torch.Tensor) -> None:
        check_frames("context", context, 1)
        check_frames("future", future, 1)
        if context.dim() != 4 or future.dim() != 5 or future.shape[0] != context.shape[0]:
            raise ValueError(f"context must be (B, 3, H, W) and future (B, T, 3, H, W) with the same B, got "
                             f"{tuple(context.shape)} and {tuple(future.shape)}")
        for name, t in (("context", context), ("future", future)):
            if tuple(t.shape[-2:]) != self.frame_size:
                raise ValueError(f"{name} frames must be {self.frame_size} (the tokenizer's frame_size), got "
                                 f"{tuple(t.shape[-2:])}")

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h/p, w/p, p*p*C): every p x p patch flattened row by row, channels fastest (the
        reference's order, which its linear layers' weights assume)."""
        p = self.patch_size
        n, c, h, w = latents.shape
        return latents.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h // p, w // p, -1)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``."""
        p = self.patch_size
        n, hp, wp, _ = patches.shape
        return patches.reshape(n, hp, wp, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(n, -1, hp * p, wp * p)

    def _encode(self, context: torch.Tensor, future: torch.Tensor):
        """(context codes, context ids, future codes (B*T, gh, gw, d), future ids (B*T, gh, gw))."""
        latents, features = self.context_encoder(context, return_features=True)
        context_codes, context_ids = quantize(self.context_quant_in(latents), self.levels)
        future_latents = self.future_encoder(future.flatten(0, 1), context_features=features)
        future_codes, future_ids = ops.fsq_quantize(self.future_quant_in(self.patchify(future_latents)), self.levels)
        return context_codes, context_ids, future_codes, future_ids.long()

    def _decode(self, context_codes: torch.Tensor, future_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes -> unclamped frames (context (B, 3, H, W), future (B*T, 3, H, W))."""
        context_frames, features = self.context_decoder(self.context_quant_out(context_codes), return_features=True)
        future_latents = self.unpatchify(self.future_quant_out(future_codes))
        return context_frames, self.future_decoder(future_latents, context_features=features)

    def forward(self, context: torch.Tensor, future: torch.Tensor):
        """Training pass: context (B, 3, H, W), future (B, T, 3, H, W) in [0, 1] -> (context reconstruction,
        future reconstruction (B, T, 3, H, W)), unclamped, with straight-through gradients through FSQ."""
        self._check_clip(context, future)
        context_codes, _, future_codes, _ = self._encode(context, future)
        context_frames, future_frames = self._decode(context_codes, future_codes)
        return context_frames, future_frames.unflatten(0, future.shape[:2])

    @torch.no_grad()
    def encode(self, context: torch.Tensor, future: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, 3, H, W), future (B, T, 3, H, W) in [0, 1] -> (context ids (B, h, w), future ids
        (B, T, h/p, w/p)), int64, each in [0, codebook_size)."""
        self._check_clip(context, future)
        _, context_ids, _, future_ids = self._encode(context, future)
        return context_ids, future_ids.unflatten(0, future.shape[:2])

    def _check_clip_ids(self, context_ids: torch.Tensor, future_ids: torch.Tensor) -> None:
        check_ids("context_ids", context_ids, self.context_grid)
        check_ids("future_ids", future_ids, self.future_grid)
        if context_ids.dim() != 3 or future_ids.dim() != 4 or future_ids.shape[0] != context_ids.shape[0]:
            raise ValueError(f"context_ids must be (B, h, w) and future_ids (B, T, h', w') with the same B, got "
                             f"{tuple(context_ids.shape)} and {tuple(future_ids.shape)}")

    @torch.no_grad()
    def decode(self, context_ids: torch.Tensor, future_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ids (B, h, w), future ids (B, T, h/p, w/p)) -> (context frame (B, 3, H, W), future frames
        (B, T, 3, H, W)), in [0, 1]."""
        self._check_clip_ids(context_ids, future_ids)
        dtype = self.context_quant_out.weight.dtype
        context_codes = codes_of(context_ids, self.levels).to(dtype)
        future_codes = ops.fsq_indices_to_codes(future_ids.flatten(0, 1), self.levels, dtype)
        context_frames, future_frames = self._decode(context_codes, future_codes)
        return context_frames.clamp_(0.0, 1.0), future_frames.clamp_(0.0, 1.0).unflatten(0, future_ids.shape[:2])

    @torch.no_grad()
    def decode_fast(self, context_ids: torch.Tensor, future_ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                    clips_per_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode`` the way ``FrameTokenizer.decode_fast`` does it (table gathers at both inputs, ``dtype``
        channels_last, fused GroupNorm + SiLU), in micro-batches of ``clips_per_batch`` clips (default: the frames
        that fit, divided by 1 + T), into float32 outputs on the ids' device."""
        self._check_clip_ids(context_ids, future_ids)
        check_fast_dtype(dtype)
        if clips_per_batch is not None and clips_per_batch < 1:
            raise ValueError(f"clips_per_batch must be at least 1, got {clips_per_batch}")
        (b, t), device = future_ids.shape[:2], future_ids.device
        context_frames = torch.empty(b, 3, *self.frame_size, device=device, dtype=torch.float32)
        future_frames = torch.empty(b, t, 3, *self.frame_size, device=device, dtype=torch.float32)
        context_weights = cast_weights(self.context_decoder, dtype)
        future_weights = cast_weights(self.future_decoder, dtype)
        step = clips_per_batch or max(
            1, decoder_frames_per_batch(self.channels, self.context_grid, device, dtype) // (1 + t))
        for start in range(0, b, step):
            clip = slice(start, start + step)
            latents = dequantize_fast(context_ids[clip], self.levels, self.context_quant_out, dtype)
            frames, features = functional_call(self.context_decoder, context_weights, (latents.permute(0, 3, 1, 2),),
                                               {"return_features": True, "fused": True})
            context_frames[clip] = frames.clamp_(0.0, 1.0)
            patches = dequantize_fast(future_ids[clip].flatten(0, 1), self.levels, self.future_quant_out, dtype)
            latents = self.unpatchify(patches).contiguous(memory_format=torch.channels_last)
            frames = functional_call(self.future_decoder, future_weights, (latents,),
                                     {"context_features": features, "fused": True})
            future_frames[clip] = frames.clamp_(0.0, 1.0).unflatten(0, (-1, t))
        return context_frames, future_frames
