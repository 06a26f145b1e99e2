"""Single-step evaluation of a video world model on held-out episodes, and the ``rlvrw eval`` command.

For every clip of ``context_frames + 1`` consecutive frames (``frame_skip`` apart, starts ``clip_stride`` apart) of
the episodes of ``split`` (default: the test split, every 100th episode), the world model sees the context frames'
tokens and actions and samples ``group_size`` next frames with ``GroupSampler``; each is decoded by the tokenizer and
scored against the TRUE next frame (its real pixels) with ``rlvrw.eval.metrics``: MSE, PSNR, SSIM, LPIPS (VGG by
default), plus the mean absolute error (the L1 of the RLVR reward). Rows of the result:

- ``model``: the first sample of each group, and its repetition rate (DESIGN.md: a prediction repeats when its
  tokens equal the last context frame's).
- ``best_of_n`` (``group_size`` > 1): per metric, the best of the G samples (RLVR-World's best-of-N).
- ``mean_of_n`` (``group_size`` > 1): every sample's metrics and repetition, averaged: the expected score of one
  sample, with less sampling noise than the first sample's alone.
- ``copy_last``: the last context frame's real pixels as the prediction; its tokens are the last context frame's,
  so its repetition rate is 1 by construction.
- ``copy_last_tokens``: the last context frame's tokens as the predicted tokens, decoded by the tokenizer: copying
  under the same tokenizer handicap as the model (repetition rate 1 by construction).
- ``tokenizer``: the tokenizer's decoding of the true next frame's tokens: the best a world model that predicts every
  token right can score (an upper bound). Its repetition rate is how often the true next frame's tokens equal the
  last context frame's: how often the data itself repeats.

Metrics are means over clips; PSNR of a frame is capped at ``PSNR_CAP_DB`` so that an exact copy (infinite PSNR)
does not make the mean infinite. ``x100`` multiplies MSE, SSIM, LPIPS and L1 by 100, as the paper reports them.
The result is written atomically as ``OUT/eval.json``, printed as a table, and a PNG strip of the first clip of
each of the first ``strip_clips`` episodes (context frames | truth | prediction | tokenizer) is saved as
``OUT/strip_episode<i>.png`` when Pillow is installed.

    rlvrw eval --model runs/rl/model --tokenizer tok.safetensors --episodes DATA_DIR --out runs/eval
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlvrw import files
from rlvrw.data.sequences import SequenceLayout
from rlvrw.eval import metrics
from rlvrw.models.transformer import WorldModelTransformer
from rlvrw.rl.config import RunConfig, config_command, option
from rlvrw.rl.pretrain import episode_stream
from rlvrw.rl.rollout import GroupSampler
from rlvrw.rl.trainer import LPIPS_NETS, FrameRenderer, load_lpips, mean_abs_error, repeated_frames, sampling_seed

logger = logging.getLogger(__name__)

METRICS = ("mse", "psnr", "ssim", "lpips", "l1")
LOWER_IS_BETTER = {"mse": True, "psnr": False, "ssim": False, "lpips": True, "l1": True}
X100 = ("mse", "ssim", "lpips", "l1")
PSNR_CAP_DB = 100.0  # an exact copy has infinite PSNR; 100 dB is an MSE of 1e-10, far below 8-bit rounding
ROWS = ("model", "best_of_n", "mean_of_n", "copy_last", "copy_last_tokens", "tokenizer")
RESULT_FILE = "eval.json"
SPLITS = ("test", "train", "all")


@dataclass
class EvalConfig(RunConfig):
    """Everything ``evaluate`` needs; every field is also a command-line flag (``--group-size 4``)."""

    model: str = option("", "the world model: a Hugging Face LlamaForCausalLM directory (`rlvrw pretrain`'s or "
                             "`rlvrw rl`'s OUT/model)")
    tokenizer: str = option("", "the FrameTokenizer checkpoint the model's tokens come from")
    episodes: str = option("", "directory of episode .npz files (with action_stats.json)")
    out_dir: str = option("runs/eval", "where eval.json and the PNG strips go")
    split: str = option("test", "episodes evaluated: test (every 100th), train or all", choices=SPLITS)
    context_frames: int = option(4, "frames (with their actions) in the prompt; must match the model's training")
    frame_skip: int = option(1, "steps between the frames of a clip")
    clip_stride: int = option(1, "frames between the starts of consecutive clips of an episode")
    max_clips: int = option(0, "evaluate at most this many clips (0: all)")
    action_bins: int = option(256, "bins per action dimension")
    group_size: int = option(1, "samples per prompt (G); the first is scored, best-of-N over all G")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(0, "sample from the k most likely frame tokens only (0: all)")
    prompts_per_batch: int = option(16, "prompts per sampling pass (the KV cache holds this x G rows)")
    lpips_net: str = option("vgg", "LPIPS backbone", choices=LPIPS_NETS)
    lpips_weights: str = option("", "LPIPS weights file (default: rlvrw's cache; 'random': untrained, tests only)")
    x100: bool = option(False, "report MSE, SSIM, LPIPS and L1 x100 (the paper's convention)")
    strip_clips: int = option(3, "save a PNG strip for the first clip of this many episodes (0: none)")
    seed: int = option(0, "seeds the sampling noise")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self):
        for name in ("context_frames", "frame_skip", "clip_stride", "action_bins", "group_size",
                     "prompts_per_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_clips", "top_k", "strip_clips", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        for name, choices in (("split", SPLITS), ("lpips_net", LPIPS_NETS),
                              ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")

    def check_inputs(self) -> None:
        """The files an evaluation reads must be named and exist."""
        for name in ("model", "tokenizer", "episodes"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model must be a model directory with config.json, got {self.model!r}")
        if not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer must be a tokenizer checkpoint file, got {self.tokenizer!r}")
        if not Path(self.episodes).is_dir():
            raise ValueError(f"episodes must be a directory of episode files, got {self.episodes!r}")



# ----------------------------------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalClips:
    """The clips of an evaluation: real frames uint8 (n, C+1, 3, H, W), their token ids (n, C+1, h*w), the action
    bins (n, C, A) of the context frames, and the episode each clip came from (n,)."""

    frames: torch.Tensor
    frame_ids: torch.Tensor
    action_bins: torch.Tensor
    episode: torch.Tensor
    token_grid: tuple[int, int]


@torch.no_grad()
def collect_clips(config: EvalConfig, tokenizer, device: torch.device) -> EvalClips:
    """Every clip of the configured split (``config.max_clips`` at most), its frames coded by ``tokenizer``."""
    span = config.context_frames * config.frame_skip + 1
    frames, ids, actions, episodes = [], [], [], []
    grid = None
    for index, (episode_frames, episode_bins) in enumerate(
            episode_stream(config.episodes, split=config.split, action_bins=config.action_bins)):
        if episode_frames.shape[0] < span:
            logger.warning("episode %d of the %s split has %d frames, fewer than a clip's %d: skipped", index,
                           config.split, episode_frames.shape[0], span)
            continue
        chw = episode_frames.permute(0, 3, 1, 2).contiguous()
        episode_ids = tokenizer.encode(chw.to(device).float().div_(255.0))  # (T, h, w)
        grid = tuple(episode_ids.shape[-2:])
        starts = range(0, episode_frames.shape[0] - span + 1, config.clip_stride)
        times = torch.tensor([[s + k * config.frame_skip for k in range(config.context_frames + 1)] for s in starts])
        frames.append(chw[times])
        ids.append(episode_ids.flatten(1).cpu()[times])
        actions.append(torch.as_tensor(episode_bins)[times[:, : config.context_frames]])
        episodes.append(torch.full((len(starts),), index))
    if not frames:
        raise ValueError(f"episodes {config.episodes!r} has no {config.split!r} episode with the {span} frames a clip "
                         "needs")
    clips = EvalClips(torch.cat(frames), torch.cat(ids), torch.cat(actions), torch.cat(episodes), grid)
    if config.max_clips and clips.frames.shape[0] > config.max_clips:
        keep = slice(0, config.max_clips)
        clips = EvalClips(clips.frames[keep], clips.frame_ids[keep], clips.action_bins[keep], clips.episode[keep],
                          grid)
    return clips


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def score_frames(pred: torch.Tensor, truth: torch.Tensor, lpips_model, x100: bool) -> dict[str, torch.Tensor]:
    """Per-frame metrics (n,) of predictions against true frames, both float in [0, 1]."""
    values = metrics.frame_metrics(pred, truth, model=lpips_model)
    values["psnr"] = values["psnr"].clamp(max=PSNR_CAP_DB)
    values["l1"] = mean_abs_error(pred, truth, 1)
    if x100:
        values = {name: v * 100 if name in X100 else v for name, v in values.items()}
    return values


def mean_row(values: dict[str, torch.Tensor], repetition: torch.Tensor | None = None) -> dict[str, float]:
    row = {name: float(values[name].double().mean()) for name in METRICS}
    if repetition is not None:
        row["repetition_rate"] = float(repetition.double().mean())
    return row


def best_of_n_row(values: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
    """Per metric, the mean over prompts of the best of each group's ``group_size`` samples."""
    return {name: float(metrics.best_of_n(values[name], group_size, maximize=not LOWER_IS_BETTER[name])[0]
                        .double().mean()) for name in METRICS}


def save_strips(out_dir: Path, clips: EvalClips, predicted: torch.Tensor, reconstructed: torch.Tensor,
                count: int) -> list[str]:
    """One PNG per clip (the first clip of each of the first ``count`` episodes): context frames | truth |
    prediction | tokenizer, left to right. Returns the paths written; none (after saying why) without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        print("Pillow is not installed: no PNG strips (pip install pillow)")
        return []
    written = []
    seen = set()
    for row, episode in enumerate(clips.episode.tolist()):
        if episode in seen or len(seen) == count:
            continue
        seen.add(episode)
        as_uint8 = [clips.frames[row, k] for k in range(clips.frames.shape[1])]
        as_uint8 += [(f.clamp(0, 1) * 255).round().to(torch.uint8).cpu() for f in (predicted[row], reconstructed[row])]
        strip = torch.cat(as_uint8, dim=2).permute(1, 2, 0).numpy()
        path = out_dir / f"strip_episode{episode}.png"
        files.write_file(path, lambda f, image=strip: Image.fromarray(image).save(f, format="PNG"))
        written.append(str(path))
    return written


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


@torch.no_grad()
def evaluate(config: EvalConfig) -> dict:
    """Evaluate as ``config`` says (see the module doc); writes ``OUT/eval.json`` and returns the same dict:
    {"model", "best_of_n" and "mean_of_n" (G > 1), "copy_last", "copy_last_tokens", "tokenizer": {metric: mean},
    "clips", "episodes", "strips", "config"}."""
    from rlvrw.models.checkpoints import load_tokenizer

    config.check_inputs()
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.tokenizer, map_location=device).requires_grad_(False)
    model = WorldModelTransformer.from_pretrained(config.model, device=device).eval()
    clips = collect_clips(config, tokenizer, device)
    layout = SequenceLayout.single_step(clips.frame_ids.shape[2], config.context_frames, clips.action_bins.shape[2],
                                       config.action_bins, tokenizer.codebook_size)
    if model.config.vocab_size < layout.vocab_size:
        raise ValueError(f"model's vocabulary ({model.config.vocab_size}) is smaller than these clips' layout needs "
                         f"({layout.vocab_size}): is context_frames or the tokenizer not the model's?")
    renderer = FrameRenderer(tokenizer, layout, clips.token_grid, torch.float32 if device.type == "cpu"
                             else torch.bfloat16)
    sampler = GroupSampler(model, layout, config.group_size, max_prompts=config.prompts_per_batch,
                           temperature=config.temperature, top_k=config.top_k, cuda_graph=device.type == "cuda")
    torch.manual_seed(config.seed)  # random LPIPS weights (tests) are then the same in every evaluation
    lpips_model = load_lpips(config, device)

    sequences = layout.build(clips.frame_ids, clips.action_bins).to(device)
    prompts, known = layout.split(sequences)
    rollout = sampler.sample(prompts, known, sampling_seed(config.seed, 0))
    group = config.group_size
    truth = clips.frames[:, -1].to(device).float().div_(255.0)
    last_context = clips.frames[:, -2].to(device).float().div_(255.0)
    predicted = renderer(rollout.ids)
    reconstructed = renderer(sequences)
    all_scores = score_frames(predicted, truth.repeat_interleave(group, dim=0), lpips_model, config.x100)
    first = slice(None, None, group)
    result = {
        "model": mean_row({name: v[first] for name, v in all_scores.items()},
                          repeated_frames(layout, rollout.ids[first])),
    }
    if group > 1:
        result["best_of_n"] = best_of_n_row(all_scores, group)
        result["mean_of_n"] = mean_row(all_scores, repeated_frames(layout, rollout.ids))
    result["copy_last"] = mean_row(score_frames(last_context, truth, lpips_model, config.x100),
                                   torch.ones(truth.shape[0]))
    copied_ids = clips.frame_ids.clone()
    copied_ids[:, -1] = clips.frame_ids[:, -2]
    copied = layout.build(copied_ids, clips.action_bins).to(device)
    result["copy_last_tokens"] = mean_row(score_frames(renderer(copied), truth, lpips_model, config.x100),
                                          repeated_frames(layout, copied))
    result["tokenizer"] = mean_row(score_frames(reconstructed, truth, lpips_model, config.x100),
                                   repeated_frames(layout, sequences))
    result.update(clips=int(truth.shape[0]), episodes=len(set(clips.episode.tolist())),
                  group_size=group, x100=config.x100, lpips_net=config.lpips_net)
    out_dir = Path(config.out_dir)
    result["strips"] = save_strips(out_dir, clips, predicted[first], reconstructed,
                                   config.strip_clips) if config.strip_clips else []
    result["config"] = config.to_dict()
    files.write_json(out_dir / RESULT_FILE, result)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Printing and the command
# ----------------------------------------------------------------------------------------------------------------------


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one line per row name, one column per metric present in any row."""
    columns = [name for name in (*METRICS, "repetition_rate") if any(name in row for row in rows.values())]
    width = max(12, *(len(name) + 2 for name in rows))
    lines = ["".join([f"{'':<{width}}"] + [f"{name:>16}" for name in columns])]
    for name, row in rows.items():
        cells = [f"{row[c]:>16.5g}" if c in row and math.isfinite(row[c]) else f"{'-':>16}" for c in columns]
        lines.append("".join([f"{name:<{width}}"] + cells))
    return "\n".join(lines)


def _run(config: EvalConfig) -> int:
    result = evaluate(config)
    print(f"{result['clips']} clips of {result['episodes']} {config.split} episodes, G={config.group_size}"
          + (" (x100: MSE, SSIM, LPIPS, L1)" if config.x100 else ""))
    print(format_table({name: result[name] for name in ROWS if name in result}))
    print(f"wrote {Path(config.out_dir) / RESULT_FILE}" + "".join(f"\nwrote {path}" for path in result["strips"]))
    return 0


add_cli, main = config_command("eval", "next-frame metrics of a world model on held-out episodes", __doc__, EvalConfig,
                               _run)


if __name__ == "__main__":
    raise SystemExit(main())
