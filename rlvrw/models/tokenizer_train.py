"""Training a ``FrameTokenizer`` on frames or a ``CompressiveTokenizer`` on clips, and the ``rlvrw tokenizer`` command.

The loss is the reference's: L1 on pixels + a perceptual loss (LPIPS) + optionally a patch-GAN generator loss that
starts after ``gan_start`` steps (hinge loss; the discriminator trains from that step on), all on the reconstruction
as it is seen: clamped to [0, 1] where the target pixel sits at that bound (``clamp_where_saturated``). With
``consistency_weight`` > 0, batches are pairs of consecutive frames and a code-consistency term
(``unstable_code_loss``) asks for the same id wherever a patch did not change. A ``CompressiveTokenizer`` trains on
clips (context frame first) with the same loss on the context frame's and the future frames' reconstructions; its
future frames are coded independently given the context, so a step may use a random ``future_frames`` of each clip's
frames, which costs less and sees more clips. AdamW with linear warmup
and a cosine decay to ``min_lr_ratio`` of the peak; bfloat16 autocast on a GPU. Optimizer steps go through
``rlvrw.guard.NonFiniteGuard`` (``on_nonfinite``: a non-finite loss term or gradient norm stops training before the
update, or skips and counts it), and a tokenizer with a non-finite weight is never saved. The perceptual loss is any
callable ``perceptual(pred, target)`` on frames in [-1, 1] (LPIPS's convention) returning per-frame or mean distances;
``lpips_loss`` builds rlvrw's LPIPS and falls back to L1 alone, saying why, when it or its weights are missing.

The quality check is PSNR against a blur baseline that keeps as many numbers per frame as there are tokens times
channels: each frame averaged over blocks of ``downsample_factor``^2 pixels (the area each token covers) and scaled
back up bilinearly. A tokenizer whose single id per block beats that has learned more than a smoothed thumbnail.

    rlvrw tokenizer --frames ../shared/data/video/fractal_sample.npz --out tok.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlvrw import checks, usage
from rlvrw.guard import ON_NONFINITE, ON_NONFINITE_HELP, NonFiniteGuard, check_on_nonfinite
from rlvrw.models.tokenizer_files import safetensors_available, save_tokenizer
from rlvrw.models.tokenizer import CompressiveTokenizer, FrameTokenizer
from rlvrw.usage import UsageError

Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    gan_weight: float = 0.0  # 0: no discriminator at all
    consistency_weight: float = 0.0  # 0: the reference's loss, frames drawn independently
    future_frames: int = 0  # CompressiveTokenizer: future frames of each clip per step, drawn at random; 0: all
    gan_start: int = 1000
    seed: int = 0
    log_every: int = 100
    on_nonfinite: str = "stop"  # rlvrw.guard: "stop" at a non-finite loss or gradient norm, or "skip" the step

    def __post_init__(self):
        usage.check_types(self)
        check_on_nonfinite(self.on_nonfinite)
        for name in ("steps", "batch_size", "log_every"):
            checks.integer(name, getattr(self, name), error=UsageError)
        for name in ("future_frames", "warmup_steps", "gan_start"):
            checks.integer(name, getattr(self, name), low=0)
        for name in ("lr", "weight_decay", "grad_clip", "l1_weight", "perceptual_weight", "gan_weight",
                     "consistency_weight"):
            checks.number(name, getattr(self, name), low=0)
        if self.consistency_weight > 0 and self.batch_size % 2:
            raise ValueError(f"batch_size must be even when consistency_weight > 0 (pairs of frames), got "
                             f"{self.batch_size}")
        checks.number("min_lr_ratio", self.min_lr_ratio, 0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Data and metrics
# ----------------------------------------------------------------------------------------------------------------------


def load_frames(path: str | Path, size: tuple[int, int] | None = None, key: str = "image") -> torch.Tensor:
    """Frames (N, H, W, 3) from an npz file -> uint8 (N, 3, H, W), resized (antialiased bilinear) to ``size``.
    A missing, empty or unreadable file, a missing array or one that is not frames is a ``UsageError`` naming it."""
    from rlvrw.files import CorruptFileError

    path = usage.existing_file("frames", path, "an .npz file of frames (N, H, W, 3) uint8")
    try:
        with np.load(path, allow_pickle=False) as data:
            if key not in data:
                raise UsageError(f"frames file {path} has no array {key!r} (--key); it has {sorted(data.keys())}")
            array = data[key]
    except UsageError:
        raise
    except Exception as err:  # not an npz, truncated, a bad member: the file is unusable
        raise CorruptFileError(f"frames file {path} cannot be read ({type(err).__name__}: {err})") from err
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.integer):
        raise UsageError(f"{path}[{key!r}] must be integer frames (N >= 1, H, W, 3), got {array.dtype} "
                         f"{array.shape}")
    if array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise UsageError(f"{path}[{key!r}] must hold 8-bit pixel values, got values in [{array.min()}, "
                         f"{array.max()}]")
    frames = torch.from_numpy(array.astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    if size is not None and tuple(frames.shape[-2:]) != tuple(size):
        resized = F.interpolate(frames.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        frames = resized.round().clamp(0, 255).to(torch.uint8)
    return frames


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float32 in [0, 1]."""
    return frames.float().div_(255.0)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB for frames in [0, 1] (value range 1), (N, 3, H, W) -> (N,)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def blur_baseline(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """Each frame averaged over factor x factor blocks and scaled back up bilinearly (frames in [0, 1])."""
    small = F.avg_pool2d(frames, factor)
    return F.interpolate(small, size=frames.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def reconstruct(model: FrameTokenizer, frames: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """uint8 frames -> their round trip through ids, float32 in [0, 1], on the model's device."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, frames.shape[0], batch_size):
        out.append(model.decode(model.encode(to_unit(frames[start:start + batch_size].to(device)))))
    return torch.cat(out)


def reconstruction_psnr(model: FrameTokenizer | CompressiveTokenizer, frames: torch.Tensor,
                        clips: torch.Tensor | None = None) -> dict:
    """Mean PSNR (dB) of the round trip through ids and of the blur baseline, on uint8 frames (N, 3, H, W).

    A ``CompressiveTokenizer`` is scored on ``clips`` (n, 1 + F) indices into ``frames``: ``psnr`` and
    ``blur_psnr`` over the future frames (the blur keeps one number per future id: blocks of (downsampling x
    patch_size)^2 pixels), ``context_psnr`` of the context frame, and ``copy_context_psnr``, the context frame's
    pixels taken for every future frame."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if clips is None:
        recon = reconstruct(model, frames)
        target = to_unit(frames.to(recon.device))
        quality = {"psnr": psnr(recon, target).mean().item(),
                   "blur_psnr": psnr(blur_baseline(target, model.downsample_factor), target).mean().item(),
                   "frames": int(frames.shape[0])}
    else:
        scores = {"psnr": [], "blur_psnr": [], "context_psnr": [], "copy_context_psnr": []}
        factor = model.frame_size[0] // model.context_grid[0] * model.patch_size
        with torch.no_grad():
            for start in range(0, clips.shape[0], 16):
                clip = to_unit(frames[clips[start:start + 16]].to(device))
                context, future = clip[:, 0], clip[:, 1:]
                context_recon, future_recon = model.decode(*model.encode(context, future))
                truth = future.flatten(0, 1)
                scores["psnr"].append(psnr(future_recon.flatten(0, 1), truth))
                scores["blur_psnr"].append(psnr(blur_baseline(truth, factor), truth))
                scores["context_psnr"].append(psnr(context_recon, context))
                scores["copy_context_psnr"].append(psnr(context[:, None].expand_as(future).flatten(0, 1), truth))
        quality = {name: torch.cat(values).mean().item() for name, values in scores.items()}
        quality["clips"] = int(clips.shape[0])
    model.train(was_training)
    return quality

evaluate = reconstruction_psnr  # deprecated: the old name, kept for one release


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------


def clamp_where_saturated(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``recon`` clamped to [0, 1] where that clamp is right (the output overshoots a target already at the bound),
    unchanged elsewhere; gradients flow through the unchanged elements only.

    Decoded frames are clamped before anyone sees them (``FrameTokenizer.decode``), so overshooting a white pixel
    costs nothing. A loss on the raw output instead pulls every such pixel to exactly 1.0 and leaves faint noise
    around it, and LPIPS, which normalizes features per position, punishes noise on flat regions hard: on 64 x 64
    PushT frames, noise of std 0.01 scores 0.15 with VGG, seven times copying the previous frame. Where the clamp
    would hide an error (above 1 where the target is below 1) the raw value keeps its gradient."""
    right = ((recon > 1) & (target >= 1)) | ((recon < 0) & (target <= 0))
    return torch.where(right, recon.detach().clamp(0.0, 1.0), recon)


def unstable_code_loss(codes: torch.Tensor, frames: torch.Tensor, pairs: int) -> torch.Tensor:
    """Mean over the patches that are the same in two frames of |code in one - code in the other| (summed over FSQ
    dimensions): zero where both got the same id.

    The first ``pairs`` rows of ``codes`` (N, D, h, w) and ``frames`` (N, 3, H, W) pair with the next ``pairs`` rows.
    Why: an encoder that sees the whole frame (group norms, mid-block attention) is free to give an unchanged patch
    a different id when something moves elsewhere, and once overshooting white is free (``clamp_where_saturated``)
    hundreds of ids decode to white. A world model then has to predict which of them the encoder will pick for a
    static background, which it cannot; this term makes "nothing changed here" mean "same id". Gradients follow
    FSQ's straight-through rounding."""
    first, second = codes[:pairs], codes[pairs:2 * pairs]
    factor = frames.shape[-1] // codes.shape[-1]
    changed = (frames[:pairs] != frames[pairs:2 * pairs]).any(1, keepdim=True).float()
    same = F.max_pool2d(changed, factor) == 0  # (pairs, 1, h, w)
    distance = (first - second).abs().sum(1, keepdim=True)
    return (distance * same).sum() / same.sum().clamp_min(1)


class PatchDiscriminator(nn.Module):
    """A patch GAN (pix2pix's): strided 4x4 convs with LeakyReLU, one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            wider = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(width, wider, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(wider), nn.LeakyReLU(0.2)]
            width = wider
        layers.append(nn.Conv2d(width, 1, 4, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames in [0, 1] -> patch logits (N, 1, h, w)."""
        return self.net(frames * 2 - 1)


def lpips_loss(net: str, device: torch.device | str, log: Callable[[str], None] = print) -> Perceptual | None:
    """rlvrw's LPIPS(``net``) as a frozen perceptual loss on ``device``, or None (after saying why) when it cannot be
    built here, e.g. without its backbone weights."""
    try:
        from rlvrw.models import LPIPS

        lpips = LPIPS(net=net)
    except (ImportError, AttributeError, OSError, ValueError) as err:  # OSError covers missing weight files
        log(f"LPIPS-{net} unavailable ({type(err).__name__}: {err}); training with L1 only")
        return None
    return lpips.to(device)  # rlvrw's LPIPS is frozen and in eval mode from the start


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def train_tokenizer(model: FrameTokenizer | CompressiveTokenizer, frames: torch.Tensor,
                    config: TrainConfig | None = None, perceptual: Perceptual | None = None,
                    log: Callable[[str], None] | None = print, clips: torch.Tensor | None = None) -> list[dict]:
    """Train ``model`` in place on uint8 ``frames`` (N, 3, H, W) (kept on the host, batches moved to the model's
    device). A ``CompressiveTokenizer`` needs ``clips``: (n, 1 + F) indices into ``frames``, the context frame first
    (``rlvrw.data.clips.clip_times`` cuts them per episode). Returns the logged history (step, lr, losses,
    seconds)."""
    config = config or TrainConfig()
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 (N, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
    compressive = isinstance(model, CompressiveTokenizer)
    if compressive != (clips is not None):
        raise ValueError("clips must be given for a CompressiveTokenizer, and only for it")
    if compressive:
        if clips.dim() != 2 or clips.shape[1] < 2 or clips.shape[0] < 1 or clips.dtype != torch.int64:
            raise ValueError(f"clips must be int64 (n >= 1, 1 + F >= 2), got {clips.dtype} {tuple(clips.shape)}")
        if clips.min() < 0 or clips.max() >= frames.shape[0]:
            raise ValueError(f"clips must index frames' {frames.shape[0]} frames, got indices in "
                             f"[{int(clips.min())}, {int(clips.max())}]")
        if config.consistency_weight > 0:
            raise ValueError("consistency_weight must be 0 for a CompressiveTokenizer (its future ids are per clip)")
        if config.future_frames > clips.shape[1] - 1:
            raise ValueError(f"future_frames ({config.future_frames}) must be at most the clips' "
                             f"{clips.shape[1] - 1} future frames")
    if config.consistency_weight > 0 and frames.shape[0] < 2:
        raise ValueError("frames must hold at least 2 frames when consistency_weight > 0 (pairs of frames)")
    device = next(model.parameters()).device
    guard = NonFiniteGuard(config.on_nonfinite, "tokenizer")
    use_gan = config.gan_weight > 0
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)

    def adamw(params):
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    optimizer = adamw(model.parameters())
    discriminator = PatchDiscriminator().to(device) if use_gan else None
    disc_optimizer = adamw(discriminator.parameters()) if use_gan else None

    model.train()
    history, start = [], time.perf_counter()
    for step in range(config.steps):
        if config.consistency_weight > 0:  # pairs (i, i + 1); a pair across two episodes has few patches in common
            first = torch.randint(0, frames.shape[0] - 1, (config.batch_size // 2,), generator=generator)
            index = torch.cat([first, first + 1])
        elif compressive:
            index = clips[torch.randint(0, clips.shape[0], (config.batch_size,), generator=generator)]
            if config.future_frames:  # per clip, its context frame and future_frames of its future frames
                picked = torch.rand(index.shape, generator=generator)[:, 1:].argsort(1)[:, :config.future_frames]
                index = torch.cat([index[:, :1], index[:, 1:].gather(1, picked)], 1)
        else:
            index = torch.randint(0, frames.shape[0], (config.batch_size,), generator=generator)
        batch = to_unit(frames[index].to(device, non_blocking=True))
        gan_on = use_gan and step >= config.gan_start
        lr = config.lr * lr_factor(step, config)
        for group in optimizer.param_groups + (disc_optimizer.param_groups if use_gan else []):
            group["lr"] = lr
        with torch.autocast(**autocast):
            if compressive:
                context, future = model(batch[:, 0], batch[:, 1:])
                recon, batch = torch.cat([context[:, None], future], 1).flatten(0, 1), batch.flatten(0, 1)
            else:
                recon, _, codes = model(batch, return_codes=True)
            recon = clamp_where_saturated(recon.float(), batch)
            l1 = (recon - batch).abs().mean()
            loss = config.l1_weight * l1
            if config.consistency_weight > 0:
                consistency = unstable_code_loss(codes.float(), batch, config.batch_size // 2)
                loss = loss + config.consistency_weight * consistency
            if perceptual is not None and config.perceptual_weight > 0:
                perceptual_loss = perceptual(recon * 2 - 1, batch * 2 - 1).mean()
                loss = loss + config.perceptual_weight * perceptual_loss
            if gan_on:
                discriminator.requires_grad_(False)  # the generator's step must not train the discriminator
                gan_loss = -discriminator(recon).float().mean()
                loss = loss + config.gan_weight * gan_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # without clipping (grad_clip 0) the norm is still taken, for the guard; the gradients are scaled by 1.0
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        terms = {"loss": loss, "l1": l1, "grad_norm": grad_norm}
        if perceptual is not None and config.perceptual_weight > 0:
            terms["perceptual"] = perceptual_loss
        guard.step(optimizer, step + 1, **terms)

        if gan_on:
            discriminator.requires_grad_(True)
            with torch.autocast(**autocast):
                real, fake = discriminator(batch).float(), discriminator(recon.detach()).float()
                disc_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()  # hinge
            disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            guard.step(disc_optimizer, step + 1, disc=disc_loss)

        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            entry = {"step": step + 1, "lr": lr, "loss": loss.item(), "l1": l1.item(),
                     "seconds": time.perf_counter() - start, "nonfinite_skipped": guard.check()}
            if perceptual is not None and config.perceptual_weight > 0:
                entry["perceptual"] = perceptual_loss.item()
            if config.consistency_weight > 0:
                entry["consistency"] = consistency.item()
            if gan_on:
                entry.update(gan=gan_loss.item(), disc=disc_loss.item())
            history.append(entry)
            if log is not None:
                log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    defaults = TrainConfig()
    p = subparsers.add_parser(
        "tokenizer", help="train a per-frame FSQ tokenizer on an npz of frames; print PSNR vs a blur baseline",
        description="Train a per-frame FSQ tokenizer (L1 + LPIPS + optional patch GAN) on an npz of frames, print "
                    "its reconstruction PSNR beside a blur baseline's, and write a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", required=True, help="npz file with frames (N, H, W, 3) uint8")
    p.add_argument("--key", default="image", help="array name in the npz")
    p.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"), help="resize frames to H x W")
    p.add_argument("--out", default=None,
                   help="checkpoint path (default tokenizer.safetensors, or tokenizer.pt without safetensors)")
    p.add_argument("--eval-frames", type=int, default=4, help="frames held out (the last ones) for evaluation")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="stage widths (paper: 128 256 "
                   "256 512 768); every stage but the last halves the frame")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--latent-channels", type=int, default=16, help="paper: 64")
    p.add_argument("--num-groups", type=int, default=16, help="GroupNorm groups (paper: 32)")
    p.add_argument("--levels", type=int, nargs="+", default=[7, 5, 5, 5, 5], help="FSQ levels")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--lpips", choices=["vgg", "alex", "squeeze", "none"], default=None,
                   help="perceptual loss network (default: vgg on a GPU, alex on CPU)")
    p.add_argument("--lpips-weight", type=float, default=defaults.perceptual_weight)
    p.add_argument("--gan-weight", type=float, default=defaults.gan_weight, help="patch-GAN weight (0: off)")
    p.add_argument("--gan-start", type=int, default=defaults.gan_start, help="step at which the GAN starts")
    p.add_argument("--consistency-weight", type=float, default=defaults.consistency_weight,
                   help="same id where a patch did not change between consecutive frames (0: off; the frames must "
                        "be in time order)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--on-nonfinite", choices=ON_NONFINITE, default=defaults.on_nonfinite, help=ON_NONFINITE_HELP)
    p.set_defaults(func=run_cli)


def _device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here")
    return device


def run_cli(args) -> int:
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, perceptual_weight=args.lpips_weight,
                         gan_weight=args.gan_weight, gan_start=args.gan_start,
                         consistency_weight=args.consistency_weight, seed=args.seed,
                         log_every=max(1, args.steps // 10), on_nonfinite=args.on_nonfinite)
    if min(args.size) < 1:
        raise UsageError(f"--size must be two positive ints (H W), got {args.size}")
    if args.eval_frames < 0:
        raise UsageError(f"--eval-frames must be >= 0, got {args.eval_frames}")
    if args.out is not None:
        usage.output_file("--out", args.out)
    device = _device(args.device)
    torch.manual_seed(args.seed)
    frames = load_frames(args.frames, tuple(args.size), args.key)
    if not 0 <= args.eval_frames < frames.shape[0]:
        raise UsageError(f"--eval-frames must lie in [0, {frames.shape[0]}) ({args.frames} has {frames.shape[0]} "
                         f"frames), got {args.eval_frames}")
    split = frames.shape[0] - args.eval_frames
    train_frames, eval_frames = frames[:split], frames[split:]
    try:
        model = FrameTokenizer(channels=args.channels, layers_per_block=args.layers_per_block,
                               latent_channels=args.latent_channels, levels=args.levels,
                               num_groups=args.num_groups).to(device)
    except ValueError as err:  # the architecture flags, checked by the model
        raise UsageError(f"the tokenizer's architecture (--channels, --layers-per-block, --latent-channels, "
                         f"--levels, --num-groups): {err}") from err
    net = args.lpips or ("vgg" if device.type == "cuda" else "alex")
    perceptual = None if net == "none" or args.lpips_weight == 0 else lpips_loss(net, device)
    grid = (frames.shape[2] // model.downsample_factor, frames.shape[3] // model.downsample_factor)
    print(f"training on {split} frames of {tuple(frames.shape[2:])} -> {grid[0]}x{grid[1]} ids, {device}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, loss L1"
          + (f" + {config.perceptual_weight} LPIPS-{net}" if perceptual is not None else "")
          + (f" + {config.gan_weight} GAN from step {config.gan_start}" if config.gan_weight else ""))
    history = train_tokenizer(model, train_frames, config, perceptual)

    metrics = {"train": reconstruction_psnr(model, train_frames)}
    if args.eval_frames:
        metrics["held_out"] = reconstruction_psnr(model, eval_frames)
    for name, m in metrics.items():
        print(f"PSNR {name} ({m['frames']} frames): tokenizer {m['psnr']:.2f} dB, "
              f"blur baseline {m['blur_psnr']:.2f} dB ({m['psnr'] - m['blur_psnr']:+.2f} dB)")
    out = args.out or ("tokenizer.safetensors" if safetensors_available() else "tokenizer.pt")
    extra = {"train_config": asdict(config), "frames": str(args.frames), "size": list(args.size),
             "perceptual": net if perceptual is not None else None, "metrics": metrics,
             "final": history[-1] if history else None}
    print(f"wrote {save_tokenizer(model, out, extra)}")
    return 0
