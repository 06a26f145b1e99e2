"""Deprecated alias of ``rlvrw.train.pretrain`` (and of the token cache, clips, tokenizing and setup that lived here),
kept for one release; ``python -m rlvrw.rl.pretrain`` runs ``rlvrw.train.pretrain``."""

from rlvrw.data.clips import ClipSampler, clip_span, clip_times, episode_stream, layout_for_cache  # noqa: F401
from rlvrw.data.token_cache import ACTION_DTYPES, TokenCache, load_token_cache, save_token_cache  # noqa: F401
from rlvrw.train.build import (  # noqa: F401
    MODEL_SIZES,
    PEAK_BF16_FLOPS,
    PRECISIONS,
    autocast_dtype,
    build_world_model,
    lr_factor,
    make_optimizer,
    make_scheduler,
    peak_flops,
    training_flops_per_sequence,
    value_checks_off_on_gpu,
)
from rlvrw.train.pretrain import (  # noqa: F401
    CACHE_FILE,
    NON_NEGATIVE_FIELDS,
    POSITIVE_INT_FIELDS,
    NextTokenLoss,
    PretrainConfig,
    add_cli,
    main,
    prepare_token_cache,
    pretrain,
    train_step,
)
from rlvrw.train.tokenize import encode_clips, tokenize_clips, tokenize_episodes  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
