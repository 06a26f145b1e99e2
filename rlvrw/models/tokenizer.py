"""The two video tokenizers of RLVR-World: frames in [0, 1] <-> discrete FSQ token ids.

``FrameTokenizer`` (the paper's single-step tokenizer; ``CNNFSQModel256`` in the reference code) codes every frame on
its own: a CNN encoder shrinks a 256x320 frame 16x to a 16x20 grid of 64-channel latents, a 1x1 conv maps each latent
to 5 numbers, FSQ with levels [7, 5, 5, 5, 5] rounds them to one of 4375 codes, and the decoder mirrors the encoder.

``CompressiveTokenizer`` (the multi-step tokenizer) spends its tokens on one context frame, coded like the above but
only 8x down (32x40 = 1280 tokens), and codes each future frame with 80 tokens (8x10): the future frame's encoder and
decoder attend, at their coarse stages, to the context frame's encoder and decoder features, so a future frame's
tokens only need to carry what changed.

The CNN is the diffusers VAE layout (``rlvrw.models.vae_blocks``: ``VAEEncoder``, ``VAEDecoder`` and their blocks).
``rlvrw.models.tokenizer_files`` loads the reference checkpoints into these modules.

The decoder has two paths. ``decode`` is the plain one (float32, NCHW, ``nn.GroupNorm`` then SiLU), used in training
and as the spec. ``FrameTokenizer.decode_fast`` is the one for RL rollouts: the FSQ table gather fused with the 1x1
conv at the input (``ops.fsq_dequantize``), bfloat16 weights and activations in channels_last, fused GroupNorm + SiLU
(``ops.group_norm_silu``), and micro-batches sized from the GPU's free memory, writing into one output on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from rlvrw import ops
from rlvrw.models.vae_blocks import VAEDecoder, VAEEncoder, stage_sizes
from rlvrw.ops.fsq import check_levels

FSQ_LEVELS = (7, 5, 5, 5, 5)  # 4375 codes, the reference's fsq_levels=12 (about 2^12)
CPU_FRAMES_PER_BATCH = 16  # decode_fast's micro-batch on CPU, where free memory says little about speed
GPU_MEMORY_FRACTION = 0.5  # share of the free GPU memory decode_fast plans to fill (the rest: allocator slack, cuDNN)
LIVE_ACTIVATIONS = 6  # activations of one stage alive at once in a ResNet block (input, norms, convs, sum)


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
        self.encoder = VAEEncoder(self.channels, layers_per_block, latent_channels, num_groups)
        self.quant_in = nn.Conv2d(latent_channels, len(self.levels), 1)
        self.quant_out = nn.Conv2d(len(self.levels), latent_channels, 1)
        self.decoder = VAEDecoder(self.channels, layers_per_block, latent_channels, num_groups)

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
        self.context_encoder = VAEEncoder(*vae)
        self.context_quant_in = nn.Conv2d(latent_channels, d, 1)
        self.context_quant_out = nn.Conv2d(d, latent_channels, 1)
        self.context_decoder = VAEDecoder(*vae)
        self.future_encoder = VAEEncoder(*vae, cross_attention=(self.frame_size, num_heads, attention_max_side))
        self.future_quant_in = nn.Linear(patch_dim, d)
        self.future_quant_out = nn.Linear(d, patch_dim)
        self.future_decoder = VAEDecoder(*vae, cross_attention=(self.context_grid, num_heads, attention_max_side))

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
