"""The whole RLVR-World pipeline on one machine, and the ``rlvrw train`` command.

    rlvrw train [--config FILE] [--run-dir DIR] [--quick] [key=value ...]

Stages, each a call into the module that owns it, each reusing what an earlier run left in the run directory:

1. data: simulator episodes (``rlvrw.data.sim.generate``; cached by its settings in rlvrw's cache directory, so
   runs share them), or the episode directory ``episodes_dir``.
2. tokenizer: a per-frame CNN-FSQ tokenizer trained on the training split's frames (``train_tokenizer``, L1 +
   LPIPS) -> ``DIR/tokenizer.safetensors`` (skipped when that file exists). With ``tokenizer_kind=compressive``,
   iVideoGPT's ``CompressiveTokenizer`` trained on the training split's clips instead, and every later stage is
   multi-step: ``predicted_frames`` frames predicted per clip after the context frame and C prompt frames.
3. pretrain: the training split tokenized once, then MLE pre-training of the world model (``rlvrw.train.pretrain``)
   -> ``DIR/pretrain/model`` (resumes from ``DIR/pretrain/checkpoints``).
4. eval (MLE): next-frame metrics on the held-out episodes (``rlvrw.train.evaluate``) -> ``DIR/eval_mle/``, sampled as
   the reference samples; with ``eval_greedy``, also greedy (the most likely token at every step) ->
   ``DIR/eval_mle_greedy/``.
5. rl: GRPO post-training from the MLE model with ``reward`` (``ops.frame_reward``'s metric; default -(L1 + LPIPS))
   (``rlvrw.train.trainer``) -> ``DIR/rl/model``.
6. eval (RLVR): the same evaluations, same clips and sampling seed -> ``DIR/eval_rlvr/`` (and ``_greedy``).

Then ``DIR/eval.json`` (DESIGN.md's contract): ``{"mle": {"mse", "psnr", "ssim", "lpips", "repetition_rate", "l1"},
"rlvr": {same}, "baselines": {"copy_last", "copy_last_tokens", "tokenizer"}, "best_of_n": {"mle", "rlvr"},
"mean_of_n": {"mle", "rlvr"}, "greedy": {"mle", "rlvr"} (empty without eval_greedy), "no_repeat": {"mle",
"rlvr"} (with eval_reject_repeats), "per_step" (multi-step: every row's per-horizon means), "next_frame",
"stage_seconds", "config"}`` (rows as ``rlvrw.train.evaluate`` defines them;
multi-step rows are means over the predicted frames, and ``next_frame`` holds the baselines', MLE's and RLVR's
metrics at the first predicted frame alone, empty single-step), printed as a table. An evaluation is reused when
its ``eval.json`` was made with the same settings.

Settings: ``DEFAULT_CONFIG`` (``PipelineConfig``'s defaults: 300 PushT episodes of 32 frames at 32 x 32, each
target held for 3 simulator steps, 8 x 8 tokens per frame, 1 context frame, a 2.8M-parameter world model with the
copy prior, 120 RL steps, evaluation sampled at temperature 1 with top-k 100 as the reference's, and greedy; sized to finish
within 15 minutes on 2 CPU cores, the budget it is held to), then the preset (``preset=smoke`` or ``--quick``: every
stage in miniature, for tests), then the config file (JSON, or YAML when PyYAML is
installed), then the ``key=value`` arguments (values are read as JSON when they parse, else as strings: ``rl_steps=50``,
``tokenizer_channels=[32,64,64,64]``, ``sim=pusht``). The resolved settings are written to ``DIR/config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlvrw import files, usage
from rlvrw.train.evaluate import RESULT_FILE, EvalConfig, evaluate, format_table, resolve_device
from rlvrw.usage import ArgumentParser, UsageError, check_types, run_command

logger = logging.getLogger(__name__)

PRESETS = {
    "default": {},
    # every stage for a few seconds: shows the pipeline runs end to end, learns nothing
    "smoke": dict(sim_episodes=6, sim_frames=7, frame_size=32, tokenizer_channels=[8, 16, 16, 16],
                  tokenizer_latent_channels=8, tokenizer_num_groups=8, tokenizer_steps=10, tokenizer_lpips="none",
                  model_overrides={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2},
                  pretrain_steps=4, pretrain_batch_size=4, rl_steps=2, rl_prompts=2, rl_group_size=2,
                  rl_lpips_net="alex", eval_group_size=2, eval_lpips_net="alex", eval_strip_clips=1),
    # multi-step, the paper's RT-1 setting at CPU size: a compressive tokenizer (16 x 16 ids for the context frame, 8 x
    # 8 for each future frame: with 4 x 4, no future frame reconstructs better than copying the last frame), 3 frames
    # predicted per clip; several times the default's cost before RL (sequences four times longer)
    "multistep": dict(tokenizer_kind="compressive", tokenizer_channels=[32, 64], tokenizer_patch_size=2,
                      tokenizer_steps=1200, predicted_frames=3, eval_reject_repeats=True),
}
LPIPS_CHOICES = ("vgg", "alex", "squeeze")
TOKENIZER_KINDS = ("frame", "compressive")
STAGES = ("data", "tokenizer", "pretrain", "eval_mle", "eval_mle_greedy", "rl", "eval_rlvr", "eval_rlvr_greedy")


@dataclass
class PipelineConfig:
    """Every setting of ``rlvrw train``; each is a ``key=value`` argument and a key of the config file."""

    preset: str = "default"
    # data
    episodes_dir: str = ""  # an episode directory to use instead of simulator data
    sim: str = "pusht"
    sim_episodes: int = 300  # every 100th episode is held out for evaluation
    sim_frames: int = 32
    sim_action_repeat: int = 0  # simulator steps per frame; 0: the simulator's default (rlvrw.data.sim)
    frame_size: int = 32
    data_seed: int = 0
    data_workers: int = 2
    # tokenizer: 32x32 frames -> 8x8 ids (two halvings: 4x4 pixels per id; with three, 8x8 pixels per id, no id
    # sequence reconstructs PushT's edges well enough to beat copying the last frame)
    tokenizer_channels: list = field(default_factory=lambda: [16, 32, 64])
    tokenizer_layers_per_block: int = 1
    tokenizer_latent_channels: int = 16
    tokenizer_num_groups: int = 16
    tokenizer_levels: list = field(default_factory=lambda: [7, 5, 5, 5, 5])
    tokenizer_steps: int = 1600
    tokenizer_batch_size: int = 8
    tokenizer_lr: float = 2e-3
    tokenizer_lpips: str = "alex"  # perceptual loss network, or "none"
    tokenizer_consistency: float = 0.3  # weight of the same-id-where-nothing-changed term (tokenizer_train)
    # "frame": a FrameTokenizer, single-step prediction of the next frame; "compressive": a CompressiveTokenizer
    # (iVideoGPT's: fine ids for a context frame, a few ids per future frame decoded against it), multi-step
    tokenizer_kind: str = "frame"
    tokenizer_patch_size: int = 4  # compressive: one future-frame id per patch_size^2 context ids
    tokenizer_future_frames: int = 2  # compressive: future frames of each clip per training step (tokenizer_train)
    predicted_frames: int = 7  # compressive: frames predicted per clip (K)
    # world model and MLE pre-training
    context_frames: int = 1  # the paper's 4 would quadruple the prompt, and CPU time, for a small model
    # WorldModelConfig fields over WorldModelConfig.small's (4 layers, hidden 256): half its width, a quarter its cost
    model_overrides: dict = field(default_factory=lambda: {"hidden_size": 128, "intermediate_size": 512})
    pretrain_steps: int = 1200
    pretrain_batch_size: int = 16
    pretrain_lr: float = 1e-3
    pretrain_warmup_steps: int = 100
    # the learned copy prior (WorldModelConfig.copy_prior_offset): every frame token's input also embeds the id at
    # its place in the previous frame. Seed 0, 93 held-out clips: after 300 steps LPIPS 0.081 -> 0.075 sampled,
    # 0.072 -> 0.060 greedy; 98.5% of unchanged tokens right at 1200 steps (changed ones: 13.5%)
    copy_prior: bool = True
    # RLVR (GRPO); the paper's loss settings stay rlvrw.train.trainer's defaults
    reward: str = "l1+lpips"  # ops.frame_reward's metric: mae, mse, psnr, ssim, lpips, l1+lpips or a weighted sum
    rl_steps: int = 120
    rl_prompts: int = 8
    rl_group_size: int = 8
    rl_lr: float = 5e-5
    rl_kl_coef: float = 1e-3
    rl_lpips_net: str = "vgg"
    # evaluation on the held-out episodes
    eval_group_size: int = 4
    eval_top_k: int = 100  # the reference evaluation's (eval_vgpt.py: temperature 1, top-k 100); 0: all tokens
    eval_clip_stride: int = 1
    eval_max_clips: int = 0
    eval_lpips_net: str = "vgg"
    eval_strip_clips: int = 3
    eval_greedy: bool = True  # also evaluate both models greedy (the most likely token at every step)
    eval_reject_repeats: bool = False  # also score the first sample per clip that repeats no frame (sampled evals)
    lpips_weights: str = ""  # "random": untrained LPIPS networks (tests only)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        check_types(self)  # True is not an int setting, 3 is not a bool one, numbers are finite
        for name in ("sim_episodes", "sim_frames", "frame_size", "data_workers", "tokenizer_layers_per_block",
                     "tokenizer_latent_channels", "tokenizer_num_groups", "tokenizer_steps", "tokenizer_batch_size",
                     "context_frames", "pretrain_steps", "pretrain_batch_size", "rl_steps", "rl_prompts",
                     "rl_group_size", "eval_group_size", "eval_clip_stride", "tokenizer_patch_size",
                     "predicted_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("sim_action_repeat", "data_seed", "tokenizer_consistency", "tokenizer_future_frames",
                     "pretrain_warmup_steps", "eval_top_k",
                     "eval_max_clips", "eval_strip_clips", "seed", "rl_kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("tokenizer_lr", "pretrain_lr", "rl_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name, choices in (("tokenizer_lpips", (*LPIPS_CHOICES, "none")), ("rl_lpips_net", LPIPS_CHOICES),
                              ("tokenizer_kind", TOKENIZER_KINDS),
                              ("eval_lpips_net", LPIPS_CHOICES), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        from rlvrw.ops.reward import reward_weights

        reward_weights(self.reward)  # ValueError naming the choices
        if len(self.tokenizer_channels) < 2:
            raise ValueError(f"tokenizer_channels needs at least two stages, got {self.tokenizer_channels!r}")
        factor = 2 ** (len(self.tokenizer_channels) - 1)
        if self.frame_size % factor:
            raise ValueError(f"frame_size ({self.frame_size}) must be divisible by the tokenizer's downsampling "
                             f"{factor} (2 ** (len(tokenizer_channels) - 1))")
        if self.multi_step:
            if self.token_grid[0] % self.tokenizer_patch_size:
                raise ValueError(f"tokenizer_patch_size ({self.tokenizer_patch_size}) must divide the context grid's "
                                 f"side {self.token_grid[0]} (frame_size / 2 ** (len(tokenizer_channels) - 1))")
            if self.tokenizer_future_frames > self.clip_frames - 1:
                raise ValueError(f"tokenizer_future_frames ({self.tokenizer_future_frames}) must be at most a clip's "
                                 f"{self.clip_frames - 1} future frames")
        if not self.episodes_dir and self.sim_frames < self.clip_frames:
            raise ValueError(f"sim_frames ({self.sim_frames}) must hold a clip of {self.clip_frames} frames")

    @property
    def multi_step(self) -> bool:
        return self.tokenizer_kind == "compressive"

    @property
    def clip_frames(self) -> int:
        """Frames per clip: C + 1 single-step; the compressive context frame, C and K multi-step."""
        return 1 + self.context_frames + self.predicted_frames if self.multi_step else self.context_frames + 1

    @property
    def token_grid(self) -> tuple[int, int]:
        """A frame's ids (single-step), the context frame's (multi-step)."""
        side = self.frame_size // 2 ** (len(self.tokenizer_channels) - 1)
        return side, side

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_CONFIG = PipelineConfig()


# ----------------------------------------------------------------------------------------------------------------------
# Settings from presets, files and key=value arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict:
    """``["key=value", ...]`` -> {key: value}, values read as JSON where they parse (numbers, lists, true/false),
    else kept as strings; dashes in keys become underscores."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"overrides must look like key=value, got {item!r}")
        try:
            values[key.replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            values[key.replace("-", "_")] = text
    return values


def read_config_file(path: str | Path) -> dict:
    """Settings from a JSON file, or a YAML one (``.yaml``/``.yml``, needs PyYAML)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ValueError(f"config file {path} is YAML; reading it needs PyYAML (pip install pyyaml)") from err
        values = yaml.safe_load(path.read_text())
    else:
        values = json.loads(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    return values


def resolve_config(file_values: dict | None = None, overrides: dict | None = None) -> PipelineConfig:
    """The defaults, then the preset named by the overrides or the file, then the file, then the overrides."""
    given = {**(file_values or {}), **(overrides or {})}
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
    preset = given.get("preset", "default")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PipelineConfig(**{**PRESETS[preset], **given})


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------


def prepare_data(config: PipelineConfig) -> Path:
    """The episode directory: ``episodes_dir``, or the simulator data set of these settings (generated once)."""
    if config.episodes_dir:
        if not Path(config.episodes_dir).is_dir():
            raise ValueError(f"episodes_dir must be a directory of episode files, got {config.episodes_dir!r}")
        return Path(config.episodes_dir)
    from rlvrw.data.sim import generate

    return generate(config.sim, None, config.sim_episodes, config.sim_frames, config.frame_size, config.data_seed,
                    config.data_workers, action_repeat=config.sim_action_repeat or None, progress=config.progress)


def training_clips(config: PipelineConfig, episodes: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's frames (N, 3, H, W) uint8 and every clip of ``clip_frames`` consecutive frames of each
    episode as indices into them (n, clip_frames): a compressive tokenizer's training data."""
    from rlvrw.data.clips import clip_times, episode_stream

    frames, clips, count = [], [], 0
    for episode, _ in episode_stream(episodes, (config.frame_size, config.frame_size), "train"):
        if len(episode) >= config.clip_frames:  # shorter episodes give no clip; pretrain skips and counts them
            clips.append(torch.from_numpy(clip_times(len(episode), config.clip_frames)) + count)
            frames.append(episode.permute(0, 3, 1, 2))
            count += len(episode)
    if not clips:
        raise ValueError(f"no training episode under {episodes} holds a clip of {config.clip_frames} frames")
    return torch.cat(frames), torch.cat(clips)


def train_tokenizer_stage(config: PipelineConfig, episodes: Path, run_dir: Path, device: torch.device) -> Path:
    """``DIR/tokenizer.safetensors``, trained on the training split's frames (a ``FrameTokenizer``) or clips (a
    ``CompressiveTokenizer``) unless it is there already."""
    from rlvrw.data.sim import export_frames
    from rlvrw.models.tokenizer_files import save_tokenizer
    from rlvrw.models.tokenizer import CompressiveTokenizer, FrameTokenizer
    from rlvrw.models.tokenizer_train import TrainConfig, load_frames, lpips_loss, reconstruction_psnr, train_tokenizer

    path = run_dir / "tokenizer.safetensors"
    if path.is_file():
        print(f"tokenizer: reusing {path}")
        return path
    architecture = dict(channels=config.tokenizer_channels, layers_per_block=config.tokenizer_layers_per_block,
                        latent_channels=config.tokenizer_latent_channels, levels=config.tokenizer_levels,
                        num_groups=config.tokenizer_num_groups)
    torch.manual_seed(config.seed)
    if config.multi_step:
        frames, clips = training_clips(config, episodes)
        # cross-attention to the context frame at the latent grid's resolution, as the reference's 32 x 40 stages
        model = CompressiveTokenizer(frame_size=(config.frame_size, config.frame_size),
                                     patch_size=config.tokenizer_patch_size, attention_max_side=config.token_grid[0],
                                     **architecture).to(device)
        data = f"{len(clips)} clips of {config.clip_frames} frames"
        grids = f"{config.token_grid[0]}x{config.token_grid[1]} context ids, " \
                f"{model.future_grid[0]}x{model.future_grid[1]} per future frame"
    else:
        frames_file = run_dir / "frames_train.npz"
        export_frames(episodes, frames_file, "train")
        frames, clips = load_frames(frames_file, (config.frame_size, config.frame_size)), None
        frames_file.unlink()
        model = FrameTokenizer(**architecture).to(device)
        data, grids = f"{len(frames)} frames", f"{config.token_grid[0]}x{config.token_grid[1]} ids"
    train_config = TrainConfig(steps=config.tokenizer_steps, batch_size=config.tokenizer_batch_size,
                               lr=config.tokenizer_lr, warmup_steps=min(100, config.tokenizer_steps // 10),
                               consistency_weight=0.0 if config.multi_step else config.tokenizer_consistency,
                               future_frames=config.tokenizer_future_frames if config.multi_step else 0,
                               seed=config.seed, log_every=max(1, config.tokenizer_steps // 5))
    perceptual = None if config.tokenizer_lpips == "none" else lpips_loss(config.tokenizer_lpips, device)
    print(f"tokenizer: {data} -> {grids}, {config.tokenizer_steps} steps")
    history = train_tokenizer(model, frames, train_config, perceptual, clips=clips)
    sample = slice(None, None, max(1, len(clips if config.multi_step else frames) // 512))  # of the training data
    quality = reconstruction_psnr(model, frames, clips[sample]) if config.multi_step else \
        reconstruction_psnr(model, frames[sample])
    print(f"tokenizer: PSNR {quality['psnr']:.2f} dB, blur baseline {quality['blur_psnr']:.2f} dB")
    save_tokenizer(model, path, {"train_config": dataclasses.asdict(train_config), "metrics": quality,
                                 "final": history[-1] if history else None})
    return path


def pretrain_stage(config: PipelineConfig, episodes: Path, tokenizer: Path, run_dir: Path) -> Path:
    from rlvrw.train.pretrain import PretrainConfig, pretrain

    out_dir = run_dir / "pretrain"
    pretrain(PretrainConfig(
        episodes=str(episodes), tokenizer=str(tokenizer), out_dir=str(out_dir), context_frames=config.context_frames,
        predicted_frames=config.predicted_frames, clip_stride=1,  # multi-step: a clip at every start frame
        model="small", model_overrides=dict(config.model_overrides), copy_prior=config.copy_prior,
        steps=config.pretrain_steps,
        micro_batch_size=config.pretrain_batch_size, lr=config.pretrain_lr,
        warmup_steps=min(config.pretrain_warmup_steps, config.pretrain_steps - 1), seed=config.seed,
        device=config.device, log_every=max(1, config.pretrain_steps // 20),
        save_every=max(1, config.pretrain_steps // 4), tensorboard="off", progress=config.progress))
    return out_dir


def rl_stage(config: PipelineConfig, tokenizer: Path, pretrain_dir: Path, run_dir: Path, name: str = "rl") -> Path:
    """RLVR from the MLE model into ``DIR/<name>`` (resumes from its checkpoints)."""
    from rlvrw.train.pretrain import CACHE_FILE
    from rlvrw.train.trainer import RLConfig, rl

    out_dir = run_dir / name
    rl(RLConfig(
        data=str(pretrain_dir / CACHE_FILE), tokenizer=str(tokenizer), out_dir=str(out_dir),
        init_from=str(pretrain_dir / "model"), token_grid=None if config.multi_step else config.token_grid,
        context_frames=config.context_frames,
        steps=config.rl_steps, prompts_per_step=config.rl_prompts, group_size=config.rl_group_size,
        rollout_prompts=config.rl_prompts, micro_batch_size=config.rl_prompts * config.rl_group_size,
        lr=config.rl_lr, kl_coef=config.rl_kl_coef, reward=config.reward, lpips_net=config.rl_lpips_net,
        lpips_weights=config.lpips_weights, seed=config.seed, device=config.device,
        log_every=max(1, config.rl_steps // 20), save_every=max(1, config.rl_steps // 2), tensorboard="off",
        progress=config.progress))
    return out_dir


def eval_stage(config: PipelineConfig, model_dir: Path, episodes: Path, tokenizer: Path, out_dir: Path,
               greedy: bool = False) -> dict:
    """The evaluation's result, reused from ``out_dir`` when it was made with the same settings. ``greedy``: one
    sample per clip, the most likely token at every step (top-k 1)."""
    eval_config = EvalConfig(
        model=str(model_dir), tokenizer=str(tokenizer), episodes=str(episodes), out_dir=str(out_dir),
        context_frames=config.context_frames, predicted_frames=config.predicted_frames,
        clip_stride=config.eval_clip_stride, max_clips=config.eval_max_clips,
        group_size=1 if greedy else config.eval_group_size, top_k=1 if greedy else config.eval_top_k,
        reject_repeats=config.eval_reject_repeats and not greedy,
        lpips_net=config.eval_lpips_net,
        lpips_weights=config.lpips_weights,
        strip_clips=config.eval_strip_clips, seed=config.seed, device=config.device)
    previous = out_dir / RESULT_FILE
    if previous.is_file():
        result = json.loads(previous.read_text())
        if result.get("config") == json.loads(json.dumps(eval_config.to_dict())):
            print(f"eval: reusing {previous}")
            return result
    return evaluate(eval_config)


DESIGN_METRICS = ("mse", "psnr", "ssim", "lpips", "repetition_rate", "l1")


def first_step(row: dict) -> dict:
    """A multi-step row's metrics at the first prediction horizon: the next frame's."""
    return {name: values[0] for name, values in row["per_step"].items()}


def summarize(config: PipelineConfig, mle: dict, rlvr: dict, stage_seconds: dict, greedy: dict | None = None) -> dict:
    """``DIR/eval.json``'s content (see the module doc); ``greedy``: {"mle", "rlvr"} greedy evaluations."""
    greedy = greedy or {}
    next_frame = {}
    if config.multi_step:
        rows = [("copy_last", mle, "copy_last"), ("copy_last_tokens", mle, "copy_last_tokens"),
                ("tokenizer", mle, "tokenizer"), ("mle", mle, "model"), ("rlvr", rlvr, "model")]
        rows += [(f"{name}_greedy", result, "model") for name, result in greedy.items()]
        next_frame = {name: first_step(result[row]) for name, result, row in rows}
    return {
        "mle": {name: mle["model"][name] for name in DESIGN_METRICS},
        "rlvr": {name: rlvr["model"][name] for name in DESIGN_METRICS},
        "baselines": {name: mle[name] for name in ("copy_last", "copy_last_tokens", "tokenizer")},
        "best_of_n": {"mle": mle.get("best_of_n"), "rlvr": rlvr.get("best_of_n"),
                      "group_size": config.eval_group_size},
        "mean_of_n": {"mle": mle.get("mean_of_n"), "rlvr": rlvr.get("mean_of_n")},
        "greedy": {name: {metric: result["model"][metric] for metric in DESIGN_METRICS}
                   for name, result in greedy.items()},
        "no_repeat": {name: result["model_no_repeat"] for name, result in (("mle", mle), ("rlvr", rlvr))
                      if "model_no_repeat" in result},
        "per_step": {name: result[row]["per_step"] for name, result, row in (
            ("copy_last", mle, "copy_last"), ("tokenizer", mle, "tokenizer"), ("mle", mle, "model"),
            ("rlvr", rlvr, "model"), ("mle_no_repeat", mle, "model_no_repeat"),
            ("rlvr_no_repeat", rlvr, "model_no_repeat"),
            *((f"{name}_greedy", result, "model") for name, result in greedy.items()))
            if "per_step" in result.get(row, {})},
        "next_frame": next_frame,
        "clips": mle["clips"],
        "episodes": mle["episodes"],
        "stage_seconds": stage_seconds,
        "config": config.to_dict(),
    }


def run(config: PipelineConfig, run_dir: str | Path) -> dict:
    """Every stage in order (see the module doc); writes and returns ``DIR/eval.json``'s content."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(run_dir / "config.json", config.to_dict())
    device = resolve_device(config.device)
    seconds = {}

    def timed(stage: str, work, *args):
        print(f"== {stage}")
        start = time.perf_counter()
        value = work(*args)
        seconds[stage] = round(time.perf_counter() - start, 1)
        return value

    episodes = timed("data", prepare_data, config)
    tokenizer = timed("tokenizer", train_tokenizer_stage, config, episodes, run_dir, device)
    pretrain_dir = timed("pretrain", pretrain_stage, config, episodes, tokenizer, run_dir)
    greedy = {}
    mle = timed("eval_mle", eval_stage, config, pretrain_dir / "model", episodes, tokenizer, run_dir / "eval_mle")
    if config.eval_greedy:
        greedy["mle"] = timed("eval_mle_greedy", eval_stage, config, pretrain_dir / "model", episodes, tokenizer,
                              run_dir / "eval_mle_greedy", True)
    rl_dir = timed("rl", rl_stage, config, tokenizer, pretrain_dir, run_dir)
    rlvr = timed("eval_rlvr", eval_stage, config, rl_dir / "model", episodes, tokenizer, run_dir / "eval_rlvr")
    if config.eval_greedy:
        greedy["rlvr"] = timed("eval_rlvr_greedy", eval_stage, config, rl_dir / "model", episodes, tokenizer,
                               run_dir / "eval_rlvr_greedy", True)
    summary = summarize(config, mle, rlvr, seconds, greedy)
    files.write_json(run_dir / RESULT_FILE, summary)
    return summary


def print_results(summary: dict, run_dir: Path) -> None:
    """Print the run's evaluation tables (every model and baseline) and where ``eval.json`` went."""
    rows = {**summary["baselines"], "mle": summary["mle"], "rlvr": summary["rlvr"]}
    rows.update({f"{model} greedy": row for model, row in summary.get("greedy", {}).items()})
    rows.update({f"{model} no-repeat": row for model, row in summary.get("no_repeat", {}).items()})
    if summary["best_of_n"]["mle"]:
        group = summary["best_of_n"]["group_size"]
        for kind in ("best", "mean"):
            for model in ("mle", "rlvr"):
                rows[f"{model} {kind}-of-{group}"] = summary[f"{kind}_of_n"][model]
    config = summary["config"]
    what = f"{config['predicted_frames']}-frame prediction (means over the frames)" if summary["next_frame"] \
        else "next-frame prediction"
    print(f"{what} on {summary['clips']} clips of {summary['episodes']} held-out episodes "
          "(tokenizer: its reconstruction of the truth, an upper bound)")
    print(format_table(rows))
    if summary["next_frame"]:
        print("the first predicted frame alone")
        print(format_table(summary["next_frame"]))
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()))
    print(f"wrote {run_dir / RESULT_FILE}")


# deprecated: the old name (rlvrw.train.config.print_summary prints a run's JSON summary), kept for one release
print_summary = print_results


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


def run_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_overrides(args.overrides)
        if args.quick:
            overrides.setdefault("preset", "smoke")
        config = resolve_config(read_config_file(args.config) if args.config else None, overrides)
    except UsageError:
        raise
    except ValueError as err:  # the settings' own checks (and a config file that is no JSON): about a setting
        raise UsageError(str(err)) from err
    usage.output_dir("--run-dir", args.run_dir)
    summary = run(config, args.run_dir)
    print_results(summary, Path(args.run_dir))
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="the whole pipeline: data, tokenizer, MLE pre-training, eval, RLVR, eval -> DIR/eval.json",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (key=value) and their defaults: "
               + ", ".join(f"{k}={json.dumps(v)}" for k, v in DEFAULT_CONFIG.to_dict().items()))
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="JSON or YAML file of settings (keys as below)")
    parser.add_argument("--run-dir", default="runs/train", help="where every stage writes (and resumes from)")
    parser.add_argument("--quick", action="store_true", help="the smoke preset: every stage in a minute or two")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings over the config file's")


def main(argv: list[str] | None = None) -> int:
    """``python -m rlvrw.train.pipeline ...``: the same as ``rlvrw train ...``."""
    parser = ArgumentParser(prog="rlvrw train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("rlvrw train", lambda: run_cli(args))


if __name__ == "__main__":
    raise SystemExit(main())
