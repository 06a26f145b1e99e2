"""Evaluation of a video world model on held-out episodes, single-step or multi-step, and the ``rlvrw eval`` command.

The tokenizer checkpoint sets the mode. With a ``FrameTokenizer`` (single-step), every clip of ``context_frames + 1``
consecutive frames (``frame_skip`` apart, starts ``clip_stride`` apart) of the episodes of ``split`` (default: the
test split, every 100th episode) gives a prompt of the context frames' tokens and actions, and the model predicts the
next frame: K = 1. With a ``CompressiveTokenizer`` (multi-step), a clip is ``1 + context_frames + predicted_frames``
frames, cut and coded as ``rlvrw.train.tokenize.tokenize_clips`` does for training (the compressive context frame first,
then the C prompt frames, then the K = ``predicted_frames`` frames to predict; the true actions after every frame are
injected by the sampler). ``GroupSampler`` draws ``group_size`` responses per prompt; each is decoded by the
tokenizer (``FrameRenderer``) and every predicted frame is scored against the TRUE frame (its real pixels) with
``rlvrw.eval.metrics``: MSE, PSNR, SSIM, LPIPS (VGG by default), plus the mean absolute error (the L1 of the RLVR
reward). A sample's metric is its mean over its K predicted frames. Rows of the result:

- ``model``: the first sample of each group, and its repetition rate (DESIGN.md: a predicted frame repeats when its
  tokens equal the previous frame's, the last context frame's for the first prediction; a sample's rate is the
  fraction of its K frames that repeat).
- ``model_no_repeat`` (``reject_repeats``): per prompt, the first sample that repeats no frame, or the first sample
  when all G repeat (``first_non_repeating``): the score of sampling with repeated samples rejected.
- ``best_of_n`` (``group_size`` > 1): per metric, the best of the G samples (RLVR-World's best-of-N);
  ``best_of_n_curve``: the same for the first N samples of each group, N = 1, 2, 4, ... up to G (RLVR-World's
  Fig. 4a), as {str(N): row}.
- ``mean_of_n`` (``group_size`` > 1): every sample's metrics and repetition, averaged: the expected score of one
  sample, with less sampling noise than the first sample's alone.
- ``copy_last``: the last context frame's real pixels as every predicted frame; its tokens are the last context
  frame's, so its repetition rate is 1 by construction.
- ``copy_last_tokens``: the last context frame's tokens as every predicted frame's tokens, decoded by the tokenizer:
  copying under the same tokenizer handicap as the model (repetition rate 1 by construction).
- ``tokenizer``: the tokenizer's decoding of the true future frames' tokens: the best a world model that predicts
  every token right can score (an upper bound). Its repetition rate is how often the true frames' tokens equal the
  previous frame's: how often the data itself repeats.

Metrics are means over clips (and predicted frames); multi-step rows but ``best_of_n`` also hold ``"per_step"``:
per metric, the K means over clips at each prediction horizon. PSNR of a frame is capped at ``PSNR_CAP_DB`` so that
an exact copy (infinite PSNR) does not make the mean infinite. ``x100`` multiplies MSE, SSIM, LPIPS and L1 by 100,
as the paper reports them. The result is written atomically as ``OUT/eval.json``, printed as a table, and a PNG strip
of the first clip of each of the first ``strip_clips`` episodes (the clip's real frames | predictions | tokenizer) is
saved as ``OUT/strip_episode<i>.png`` when Pillow is installed.

    rlvrw eval --model runs/rl/model --tokenizer tok.safetensors --episodes DATA_DIR --out runs/eval
    rlvrw eval --model runs/msp/model --tokenizer compressive.safetensors --episodes DATA_DIR --context-frames 1 \\
        --predicted-frames 7 --group-size 16 --reject-repeats
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlvrw import files, usage
from rlvrw.data.sequences import SequenceLayout
from rlvrw.eval import metrics
from rlvrw.models.tokenizer import CompressiveTokenizer
from rlvrw.models.transformer import WorldModelTransformer
from rlvrw import checks
from rlvrw.data.clips import clip_span, clip_times, episode_stream
from rlvrw.train import checkpoints
from rlvrw.train.config import RunConfig, check_model_dir, config_command, option
from rlvrw.train.render import FrameRenderer, repeated_frames
from rlvrw.train.rollout import GroupSampler
from rlvrw.train.tokenize import encode_clips
from rlvrw.train.trainer import LPIPS_NETS, load_lpips, sampling_seed
from rlvrw.usage import UsageError

logger = logging.getLogger(__name__)

METRICS = ("mse", "psnr", "ssim", "lpips", "l1")
LOWER_IS_BETTER = {"mse": True, "psnr": False, "ssim": False, "lpips": True, "l1": True}
X100 = ("mse", "ssim", "lpips", "l1")
PSNR_CAP_DB = 100.0  # an exact copy has infinite PSNR; 100 dB is an MSE of 1e-10, far below 8-bit rounding
ROWS = ("model", "model_no_repeat", "best_of_n", "mean_of_n", "copy_last", "copy_last_tokens", "tokenizer")
RESULT_FILE = "eval.json"
SPLITS = ("test", "train", "all")


@dataclass
class EvalConfig(RunConfig):
    """Everything ``evaluate`` needs; every field is also a command-line flag (``--group-size 4``)."""

    model: str = option("", "the world model: a Hugging Face LlamaForCausalLM directory (`rlvrw pretrain`'s or "
                             "`rlvrw rl`'s OUT/model)")
    tokenizer: str = option("", "the tokenizer checkpoint the model's tokens come from: a FrameTokenizer "
                                 "(single-step evaluation) or a CompressiveTokenizer (multi-step)")
    episodes: str = option("", "directory of episode .npz files (with action_stats.json)")
    out_dir: str = option("runs/eval", "where eval.json and the PNG strips go")
    split: str = option("test", "episodes evaluated: test (every 100th), train or all", choices=SPLITS)
    context_frames: int = option(4, "frames (with their actions) in the prompt; must match the model's training")
    predicted_frames: int = option(7, "multi-step (a CompressiveTokenizer): frames predicted per clip; must match "
                                      "the model's training")
    frame_skip: int = option(1, "steps between the frames of a clip")
    clip_stride: int = option(1, "frames between the starts of consecutive clips of an episode")
    max_clips: int = option(0, "evaluate at most this many clips (0: all)")
    action_bins: int = option(256, "bins per action dimension")
    group_size: int = option(1, "samples per prompt (G); the first is scored, best-of-N over all G")
    reject_repeats: bool = option(False, "also score, per prompt, the first sample that repeats no frame (the first "
                                         "sample when all G do): the model_no_repeat row")
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
        super().__post_init__()
        for name in ("context_frames", "predicted_frames", "frame_skip", "clip_stride", "action_bins", "group_size",
                     "prompts_per_batch"):
            checks.integer(name, getattr(self, name))
        for name in ("max_clips", "top_k", "strip_clips", "seed"):
            checks.integer(name, getattr(self, name), low=0)
        checks.positive("temperature", self.temperature)
        checks.choice("device", self.device, ("auto", "cpu", "cuda"))

    def check_inputs(self) -> None:
        """The files an evaluation reads must be named and exist, and ``out_dir`` be no file."""
        check_model_dir("model", self.model)
        usage.existing_file("tokenizer", self.tokenizer, "a tokenizer checkpoint file")
        usage.existing_dir("episodes", self.episodes, "a directory of episode files", "*.npz")
        usage.output_dir("out_dir", self.out_dir)



# ----------------------------------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalClips:
    """The clips of an evaluation, n of them: their real frames uint8 (n, F, 3, H, W), the layout's frame ids
    (n, C+K, N) and action bins (n, num_actions, A), the multi-step context ids (n, M) (None for single-step), the
    episode each clip came from (n,), and the frame tokenizer's token grid (single-step). Single-step: F = C+1, the
    frames the ids code. Multi-step: F = 1+C+K, the compressive tokenizer's context frame first (the module doc of
    ``rlvrw.train.tokenize`` gives the alignment)."""

    frames: torch.Tensor
    frame_ids: torch.Tensor
    action_bins: torch.Tensor
    context_ids: torch.Tensor | None
    episode: torch.Tensor
    token_grid: tuple[int, int] | None

    def head(self, count: int) -> EvalClips:
        """The first ``count`` clips."""
        first = slice(0, count)
        context = None if self.context_ids is None else self.context_ids[first]
        return EvalClips(self.frames[first], self.frame_ids[first], self.action_bins[first], context,
                         self.episode[first], self.token_grid)


@torch.no_grad()
def collect_clips(config: EvalConfig, tokenizer, device: torch.device) -> EvalClips:
    """Every clip of the configured split (``config.max_clips`` at most), coded by ``tokenizer``: frame by frame
    (single-step), or clip by clip as ``rlvrw.train.tokenize.tokenize_clips`` codes them (multi-step)."""
    multi = isinstance(tokenizer, CompressiveTokenizer)  # the tokenizer sets the mode
    predicted = config.predicted_frames if multi else 1
    clip_frames = int(multi) + config.context_frames + predicted  # multi-step: the compressive context frame first
    num_actions = config.context_frames + (predicted if multi else 0)  # single-step: no action after the prediction
    frames, ids, contexts, actions, episodes = [], [], [], [], []
    grid = None
    for index, (episode_frames, episode_bins) in enumerate(
            episode_stream(config.episodes, split=config.split, action_bins=config.action_bins)):
        try:
            times = clip_times(episode_frames.shape[0], clip_frames, config.frame_skip, config.clip_stride)
        except ValueError as err:
            logger.warning("episode %d of the %s split is shorter than a clip (%s): skipped", index, config.split,
                           err)
            continue
        chw = episode_frames.permute(0, 3, 1, 2).contiguous()
        if multi:
            if tuple(chw.shape[-2:]) != tokenizer.frame_size:
                raise UsageError(f"episodes {config.episodes!r} hold {tuple(chw.shape[-2:])} frames, but the "
                                 f"tokenizer codes {tokenizer.frame_size} frames (its frame_size)")
            context_ids, clip_ids = encode_clips(tokenizer, chw, times, device)
            contexts.append(context_ids)
            frame_times = times[:, 1:]  # the layout's frames follow the context frame
        else:
            episode_ids = tokenizer.encode(chw.to(device).float().div_(255.0))  # (T, h, w)
            grid = tuple(episode_ids.shape[-2:])
            clip_ids = episode_ids.flatten(1).cpu()[times]
            frame_times = times
        frames.append(chw[times])
        ids.append(clip_ids)
        actions.append(torch.as_tensor(episode_bins)[frame_times[:, :num_actions]])
        episodes.append(torch.full((len(times),), index))
    if not frames:
        span = clip_span(clip_frames, config.frame_skip)
        raise UsageError(f"episodes {config.episodes!r} has no {config.split!r} episode with the {span} frames a clip "
                         "needs")
    clips = EvalClips(torch.cat(frames), torch.cat(ids), torch.cat(actions),
                      torch.cat(contexts) if multi else None, torch.cat(episodes), grid)
    return clips.head(config.max_clips) if config.max_clips else clips


def clip_layout(config: EvalConfig, tokenizer, clips: EvalClips) -> SequenceLayout:
    """The sequence layout of the clips: multi-step for a compressive tokenizer's, else single-step."""
    frame_tokens, action_dims = clips.frame_ids.shape[2], clips.action_bins.shape[2]
    if clips.context_ids is None:
        return SequenceLayout.single_step(frame_tokens, config.context_frames, action_dims, config.action_bins,
                                          tokenizer.codebook_size)
    return SequenceLayout.multi_step(clips.context_ids.shape[1], frame_tokens, config.context_frames,
                                     config.predicted_frames, action_dims, config.action_bins,
                                     tokenizer.codebook_size)


def check_model_reads(model: WorldModelTransformer, layout: SequenceLayout, model_path: str) -> None:
    """The model's vocabulary and positions must hold the layout's sequences."""
    if model.config.vocab_size < layout.vocab_size or model.config.max_position_embeddings < layout.seq_len:
        raise UsageError(f"model {model_path!r} (vocab {model.config.vocab_size}, "
                         f"{model.config.max_position_embeddings} positions) cannot read these clips' {layout.mode} "
                         f"sequences (vocab {layout.vocab_size}, {layout.seq_len} tokens): are context_frames, "
                         "predicted_frames and the tokenizer the model's?")


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def score_frames(pred: torch.Tensor, truth: torch.Tensor, lpips_model, x100: bool) -> dict[str, torch.Tensor]:
    """Per-frame metrics (n,) of predictions against true frames, both float in [0, 1]."""
    values = metrics.frame_metrics(pred, truth, model=lpips_model)
    values["psnr"] = values["psnr"].clamp(max=PSNR_CAP_DB)
    values["l1"] = metrics.mae(pred, truth)
    if x100:
        values = {name: v * 100 if name in X100 else v for name, v in values.items()}
    return values


def score_steps(pred: torch.Tensor, truth: torch.Tensor, lpips_model, x100: bool) -> dict[str, torch.Tensor]:
    """Per-frame metrics (m, K) of predicted frames (m, K, 3, H, W) against true frames of the same shape."""
    values = score_frames(pred.flatten(0, 1), truth.flatten(0, 1), lpips_model, x100)
    return {name: v.unflatten(0, pred.shape[:2]) for name, v in values.items()}


def mean_row(values: dict[str, torch.Tensor], repetition: torch.Tensor | None = None,
             per_step: bool = False) -> dict[str, float]:
    """Means over clips and predicted frames of metrics (m, K); with ``per_step``, also ``"per_step"``: per metric,
    the K means over clips of each prediction horizon."""
    row = {name: float(values[name].double().mean()) for name in METRICS}
    if repetition is not None:
        row["repetition_rate"] = float(repetition.double().mean())
    if per_step:
        row["per_step"] = {name: values[name].double().mean(dim=0).tolist() for name in METRICS}
    return row


def best_of_n_row(values: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
    """Per metric, the mean over prompts of the best of each group's ``group_size`` samples, a sample's score being
    its mean over its K predicted frames."""
    return {name: float(metrics.best_of_n(values[name].mean(dim=1), group_size,
                                          maximize=not LOWER_IS_BETTER[name])[0].double().mean())
            for name in METRICS}


def best_of_n_curve(values: dict[str, torch.Tensor], group_size: int) -> dict[str, dict[str, float]]:
    """{str(N): ``best_of_n_row`` of the first N samples of each group} for N = 1, 2, 4, ... <= group_size, and
    group_size itself."""
    sizes = sorted({1 << i for i in range(group_size.bit_length()) if 1 << i <= group_size} | {group_size})
    curve = {}
    for n in sizes:
        first_n = {name: v.unflatten(0, (-1, group_size))[:, :n].flatten(0, 1) for name, v in values.items()}
        curve[str(n)] = best_of_n_row(first_n, n)
    return curve


def first_non_repeating(repetition: torch.Tensor, group_size: int) -> torch.Tensor:
    """Flat indices (B,) into B groups of ``group_size`` samples (``repetition`` (B*G,), each sample's fraction of
    repeated frames): per group, the first sample that repeats no frame (repetition 0), or the group's first sample
    when every one repeats."""
    repeats = repetition.view(-1, group_size) > 0
    within = (~repeats).int().argmax(dim=1)  # the first maximum: the first non-repeating sample, or 0 if none
    return torch.arange(0, repetition.numel(), group_size, device=repetition.device) + within


def save_strips(out_dir: Path, clips: EvalClips, predicted: torch.Tensor, reconstructed: torch.Tensor,
                count: int) -> list[str]:
    """One PNG per clip (the first clip of each of the first ``count`` episodes): the clip's real frames (context
    frames, then the true future) | the K predicted frames | the K tokenizer reconstructions, left to right
    (``predicted`` and ``reconstructed`` (n, K, 3, H, W)). Returns the paths written; none (after saying why)
    without Pillow."""
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
        decoded = torch.cat([predicted[row], reconstructed[row]])
        as_uint8 = [*clips.frames[row], *(decoded.clamp(0, 1) * 255).round().to(torch.uint8).cpu()]
        strip = torch.cat(as_uint8, dim=2).permute(1, 2, 0).numpy()
        path = out_dir / f"strip_episode{episode}.png"
        files.write_file(path, lambda f, image=strip: Image.fromarray(image).save(f, format="PNG"))
        written.append(str(path))
    return written


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def render_steps(renderer: FrameRenderer, ids: torch.Tensor) -> torch.Tensor:
    """The frames that sequences (n, seq_len) predict, as (n, K, 3, H, W) in both modes (single-step: K = 1)."""
    frames = renderer(ids)
    return frames if renderer.layout.multi else frames[:, None]


def copied_last_frame(layout: SequenceLayout, clips: EvalClips) -> torch.Tensor:
    """The clips' sequences with every predicted frame's ids replaced by the last context frame's."""
    steps = layout.predicted_frames
    frame_ids = clips.frame_ids.clone()
    frame_ids[:, -steps:] = clips.frame_ids[:, -steps - 1 : -steps]
    return layout.build(frame_ids, clips.action_bins, clips.context_ids)


@torch.no_grad()
def evaluate(config: EvalConfig) -> dict:
    """Evaluate as ``config`` says (see the module doc); writes ``OUT/eval.json`` and returns the same dict:
    {"model", "model_no_repeat" (``reject_repeats``), "best_of_n" and "mean_of_n" (G > 1), "copy_last",
    "copy_last_tokens", "tokenizer": {metric: mean} (multi-step: every row but best_of_n also has "per_step"),
    "clips", "episodes", "group_size", "x100", "lpips_net", "strips", "config"}."""
    from rlvrw.models.tokenizer_files import load_tokenizer

    config.check_inputs()
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.tokenizer, map_location=device).requires_grad_(False)
    model = checkpoints.load_model(config.model, "model", device=device).eval()
    clips = collect_clips(config, tokenizer, device)
    layout = clip_layout(config, tokenizer, clips)
    check_model_reads(model, layout, config.model)
    renderer = FrameRenderer(tokenizer, layout, clips.token_grid, torch.float32 if device.type == "cpu"
                             else torch.bfloat16)
    sampler = GroupSampler(model, layout, config.group_size, max_prompts=config.prompts_per_batch,
                           temperature=config.temperature, top_k=config.top_k, cuda_graph=device.type == "cuda")
    torch.manual_seed(config.seed)  # random LPIPS weights (tests) are then the same in every evaluation
    lpips_model = load_lpips(config, device)

    sequences = layout.build(clips.frame_ids, clips.action_bins, clips.context_ids).to(device)
    prompts, known = layout.split(sequences)
    rollout = sampler.sample(prompts, known, sampling_seed(config.seed, 0))
    group, steps = config.group_size, layout.predicted_frames
    truth = clips.frames[:, -steps:].to(device).float().div_(255.0)  # (n, K, 3, H, W)
    last_context = clips.frames[:, -steps - 1].to(device).float().div_(255.0)

    def score(pred: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics (m*n, K) of predictions (m*n, K, 3, H, W): m consecutive rows per clip."""
        return score_steps(pred, truth.repeat_interleave(pred.shape[0] // truth.shape[0], dim=0), lpips_model,
                           config.x100)

    def row(values: dict[str, torch.Tensor], repetition: torch.Tensor) -> dict:
        return mean_row(values, repetition, per_step=layout.multi)

    predicted = render_steps(renderer, rollout.ids)
    reconstructed = render_steps(renderer, sequences)
    all_scores = score(predicted)
    repetition = repeated_frames(layout, rollout.ids)
    first = slice(None, None, group)
    result = {"model": row({name: v[first] for name, v in all_scores.items()}, repetition[first])}
    if config.reject_repeats:
        chosen = first_non_repeating(repetition, group)
        result["model_no_repeat"] = row({name: v[chosen] for name, v in all_scores.items()}, repetition[chosen])
    if group > 1:
        result["best_of_n"] = best_of_n_row(all_scores, group)
        result["best_of_n_curve"] = best_of_n_curve(all_scores, group)
        result["mean_of_n"] = row(all_scores, repetition)
    result["copy_last"] = row(score(last_context[:, None].expand_as(truth)), torch.ones(truth.shape[0]))
    copied = copied_last_frame(layout, clips).to(device)
    result["copy_last_tokens"] = row(score(render_steps(renderer, copied)), repeated_frames(layout, copied))
    result["tokenizer"] = row(score(reconstructed), repeated_frames(layout, sequences))
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
    multi = "per_step" in result["model"]
    print(f"{result['clips']} clips of {result['episodes']} {config.split} episodes, G={config.group_size}"
          + (f", {config.predicted_frames} predicted frames (means over them)" if multi else "")
          + (" (x100: MSE, SSIM, LPIPS, L1)" if config.x100 else ""))
    print(format_table({name: result[name] for name in ROWS if name in result}))
    print(f"wrote {Path(config.out_dir) / RESULT_FILE}" + "".join(f"\nwrote {path}" for path in result["strips"]))
    return 0


add_cli, main = config_command("eval", "next-frame metrics of a world model on held-out episodes", __doc__, EvalConfig,
                               _run)


if __name__ == "__main__":
    raise SystemExit(main())
