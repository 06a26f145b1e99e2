"""Deprecated alias of ``rlvrw.train.trainer`` (and of the scoring and rendering that lived here), kept for one
release; ``python -m rlvrw.rl.trainer`` runs ``rlvrw.train.trainer``."""

from rlvrw.train.trainer import (  # noqa: F401
    LPIPS_NETS,
    OLD_LOGP_SOURCES,
    PHASES,
    RANDOM_LPIPS,
    REFERENCE_DTYPES,
    REWARD_TERMS,
    SAMPLE_SUMS,
    SUMMED,
    TOKEN_MEANS,
    FrameRenderer,
    GRPOTrainer,
    PhaseTimer,
    ReferencePolicy,
    RLConfig,
    SampledTokenLogprobs,
    add_cli,
    load_lpips,
    main,
    mean_abs_error,
    reduce_metrics,
    repeated_frames,
    rl,
    sampled_token_range,
    sampling_seed,
)

if __name__ == "__main__":
    raise SystemExit(main())
