"""The package ``rlvrw.rl`` became ``rlvrw.train`` (its token cache and clips moved to ``rlvrw.data``); for one
release the old module paths are aliases: every public name an old module defined is still there and is the very
object of its new home, and the ``python -m`` / ``torchrun -m`` entry points run under both names."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The public names each rlvrw.rl module defined before the move (read from the last commit that had them).
OLD_NAMES = {
    "pretrain": "CACHE_FILE ACTION_DTYPES PRECISIONS MODEL_SIZES PEAK_BF16_FLOPS TokenCache save_token_cache "
                "load_token_cache clip_span clip_times encode_clips tokenize_episodes tokenize_clips ClipSampler "
                "layout_for_cache NextTokenLoss POSITIVE_INT_FIELDS NON_NEGATIVE_FIELDS PretrainConfig "
                "build_world_model make_optimizer lr_factor make_scheduler autocast_dtype training_flops_per_sequence "
                "peak_flops value_checks_off_on_gpu train_step prepare_token_cache episode_stream pretrain add_cli main",
    "trainer": "OLD_LOGP_SOURCES REFERENCE_DTYPES LPIPS_NETS RANDOM_LPIPS PHASES RLConfig sampled_token_range "
               "SampledTokenLogprobs ReferencePolicy FrameRenderer mean_abs_error repeated_frames sampling_seed "
               "PhaseTimer REWARD_TERMS SAMPLE_SUMS TOKEN_MEANS SUMMED GRPOTrainer reduce_metrics load_lpips rl add_cli "
               "main",
    "evaluate": "METRICS LOWER_IS_BETTER X100 PSNR_CAP_DB ROWS RESULT_FILE SPLITS EvalConfig EvalClips collect_clips "
                "clip_layout check_model_reads score_frames score_steps mean_row best_of_n_row best_of_n_curve "
                "first_non_repeating save_strips resolve_device render_steps copied_last_frame evaluate format_table "
                "add_cli main",
    "checkpoint": "MODEL_FILE CONFIG_FILE OPTIMIZER_FILE TRAINER_STATE_FILE STEP_DIR RESUME_HELP step_dir_name "
                  "save_model load_model FULL_ON_CPU full_model_state full_optimizer_state rng_state set_rng_state "
                  "save_checkpoint list_checkpoints latest_checkpoint read_trainer_state skipped_steps start_or_resume "
                  "load_checkpoint",
    "config": "BOOKKEEPING_FIELDS RunConfig check_token_cache check_model_dir print_summary option add_arguments "
              "config_from_args config_differences config_command",
    "distributed": "STRATEGIES DistributedContext torchrun_environment resolve_device setup teardown get_rank "
                   "get_world_size is_main barrier all_reduce_sum wrap_model unwrap gradient_sync",
    "logging": "METRICS_FILE TENSORBOARD_DIR TENSORBOARD_CHOICES read_metrics format_value RunLogger",
    "rollout": "MASK32 HASH_MULTIPLIER UNIFORM_BITS mix32 gumbel_noise sample_tokens Rollout GroupSampler",
    "pipeline": "PRESETS LPIPS_CHOICES TOKENIZER_KINDS STAGES PipelineConfig DEFAULT_CONFIG parse_overrides "
                "read_config_file resolve_config prepare_data training_clips train_tokenizer_stage pretrain_stage "
                "rl_stage eval_stage DESIGN_METRICS first_step summarize run print_summary run_cli add_cli "
                "add_arguments main",
    "experiment": "PARTS ALL_PARTS MULTISTEP_ROWS REWARDS GROUP_SIZES BEST_OF TABLE_METRICS HIGHER_IS_BETTER BEGIN END "
                  "DEFAULT_ROWS seed_pipeline rl_variant run_metrics run_group_sizes run_best_of_n run_multistep "
                  "mean_over_seeds default_rows run relative_gain plot report replace_block add_cli main",
}
NEW_HOMES = ["rlvrw.train", "rlvrw.data.token_cache", "rlvrw.data.clips"]


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_old_module_has_every_old_name_as_the_new_object(module):
    old = importlib.import_module(f"rlvrw.rl.{module}")
    # pipeline and experiment are registered as the new modules themselves: the package's docstring says so
    doc = importlib.import_module("rlvrw.rl").__doc__ if old.__name__.startswith("rlvrw.train.") else old.__doc__
    assert "deprecated" in doc.lower()
    for name in OLD_NAMES[module].split():
        value = getattr(old, name)  # AttributeError names what the alias lost
        homes = [m for m in map(importlib.import_module, _new_modules()) if getattr(m, name, None) is value]
        assert homes, f"rlvrw.rl.{module}.{name} is not the object of any module under {NEW_HOMES}"


def _new_modules() -> list[str]:
    root = ROOT / "rlvrw"
    names = [f"rlvrw.train.{p.stem}" for p in sorted((root / "train").glob("*.py")) if p.stem != "__init__"]
    return names + NEW_HOMES[1:]


def test_pipeline_and_experiment_are_the_new_modules():
    import rlvrw.rl.experiment
    import rlvrw.rl.pipeline
    import rlvrw.train.experiment
    import rlvrw.train.pipeline

    assert rlvrw.rl.pipeline is rlvrw.train.pipeline and rlvrw.rl.experiment is rlvrw.train.experiment


@pytest.mark.parametrize("module", ["rlvrw.rl.pretrain", "rlvrw.train.pretrain", "rlvrw.rl.trainer",
                                    "rlvrw.train.trainer"])
def test_python_dash_m_entry_points(module):
    """What torchrun runs: ``python -m MODULE --help`` prints the command's usage and exits 0, under either name."""
    command = "pretrain" if module.endswith("pretrain") else "rl"
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: rlvrw {command} ") and "--config" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


def test_renamed_functions_keep_their_old_names():
    """Names that said too little or twice what two things were got new ones; the old stay as the same objects."""
    from rlvrw.lang import hf_model
    from rlvrw.lang import train as lang_train
    from rlvrw.models import tokenizer_train
    from rlvrw.train import pipeline

    assert lang_train.load_tokenizer is hf_model.load_text_tokenizer  # the video one: models.tokenizer_files
    for name in ("merged_copy", "merged_weights", "transformers"):  # the HF helpers moved to lang.hf_model
        assert getattr(lang_train, name) is getattr(hf_model, name)
    assert tokenizer_train.evaluate is tokenizer_train.reconstruction_psnr
    assert pipeline.print_summary is pipeline.print_results  # train.config.print_summary prints a run's JSON


def test_tokenizer_files_keep_their_old_module_path():
    """models/checkpoints.py (tokenizer weights, beside the run checkpoints of train/checkpoints.py) is now
    models/tokenizer_files.py; the old module re-exports the very objects."""
    from rlvrw.models import checkpoints, tokenizer_files

    names = [name for name in vars(tokenizer_files) if not name.startswith("_")
             and getattr(vars(tokenizer_files)[name], "__module__", None) == tokenizer_files.__name__]
    assert {"load_tokenizer", "save_tokenizer", "load_pretrained_frame_tokenizer"} <= set(names)
    for name in names:
        assert getattr(checkpoints, name) is getattr(tokenizer_files, name), name
