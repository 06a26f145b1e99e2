"""Hugging Face causal LMs as rlvrw's language world models: loading (local directories only), LoRA adapters,
gradient checkpointing, and saving with LoRA merged in.

The trainer (``rlvrw.lang.train``) and the rollout engines (``rlvrw.lang.rollout``) both use these; neither imports
the other for them. Heavy dependencies (transformers, peft) are imported when a model is loaded; without them, the
error says which extra installs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rlvrw import checks
from rlvrw.files import verify_directory, write_directory, write_json
from rlvrw.guard import check_finite_state
from rlvrw.usage import require

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapters (``peft``): rank 32, alpha 16, on every linear layer but the output layer by default."""

    rank: int = 32
    alpha: int = 16
    target_modules: str | list[str] = "all-linear"
    dropout: float = 0.0

    def __post_init__(self):
        checks.integer("lora rank", self.rank)
        checks.positive("lora alpha", self.alpha)
        checks.number("lora dropout", self.dropout, 0, 1, high_open=True)


def resolve_device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def transformers():
    """The ``transformers`` package, or a one-line error naming the extra that installs it."""
    return require("transformers", "rlvrw.lang's language models", "transformers", "lang")


def load_text_tokenizer(model_dir: str):
    """The Hugging Face tokenizer of a local model directory, with a pad token (its end token when it has none)."""
    tokenizer = transformers().AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str, device: torch.device, dtype: torch.dtype, *, trainable: bool = True):
    """A causal LM from a local directory (nothing is downloaded), on ``device`` in ``dtype``; frozen unless
    ``trainable``. A directory this module wrote is checked against its manifest first (``rlvrw.files``)."""
    verify_directory(model_dir)
    model = transformers().AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model = model.to(device)
    model.requires_grad_(trainable)
    return model if trainable else model.eval()


def add_lora(model, settings: LoraSettings):
    """Wrap ``model`` with LoRA adapters; only they train. The output layer is never adapted: log-probs are taken
    from its weight directly."""
    peft = require_peft()

    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=settings.target_modules,
                             lora_dropout=settings.dropout, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    if isinstance(wrapped.get_output_embeddings(), peft.tuners.lora.LoraLayer):
        raise ValueError("lora target_modules must not include the output layer (lm_head)")
    return wrapped


def require_peft():
    """The ``peft`` package, or a one-line error naming the extra that installs it."""
    return require("peft", "LoRA training (lora; full fine-tuning, `--no-lora`, does not)", "peft", "lang")


def is_lora(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # without peft no model has adapters
        return False
    return isinstance(model, PeftModel)


def causal_lm(model):
    """The plain causal LM inside ``model`` (``model`` itself when it has no LoRA adapters)."""
    return model.get_base_model() if is_lora(model) else model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward (non-reentrant, so frozen inputs are fine)."""
    lm = causal_lm(model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers 5 renamed it
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def merged_weights(model):
    """``(name, tensor)`` of the model as a plain causal LM: LoRA deltas added to their base weights, adapter
    tensors left out, names as in the base model's checkpoint. The model is not modified (no merge/unmerge, whose
    rounding would drift the base weights in low precision). For weight sync and checkpoints."""
    if not is_lora(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {f"{name}.base_layer.weight": module for name, module in base.named_modules()
               if isinstance(module, LoraLayer) and not module.merged}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        if name in adapted:  # the delta is made when its weight is reached: one layer's worth of memory at a time
            module = adapted[name]
            tensor = tensor + sum(module.get_delta_weight(a) for a in module.active_adapters).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor


def save_model(model, tokenizer, path: str, info: dict | None = None) -> None:
    """A plain model directory at ``path`` (LoRA merged in), with the tokenizer and ``info`` as
    ``trainer_state.json``; written whole or not at all."""
    plain = merged_copy(model) if is_lora(model) else model
    check_finite_state(plain.named_parameters(), f"model {path}")

    def write(tmp):
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            write_json(os.path.join(tmp, "trainer_state.json"), info)

    write_directory(path, write)


def merged_copy(model):
    """A plain causal LM holding ``merged_weights(model)``. It is built on the meta device, so no random
    initialization is paid for, and shares the tensors LoRA does not change."""
    base = model.get_base_model()
    with torch.device("meta"):
        plain = transformers().AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    plain.load_state_dict(dict(merged_weights(model)), assign=True)
    plain.generation_config = base.generation_config
    return plain


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters that train: the adapters' with LoRA, every one without."""
    return [p for p in model.parameters() if p.requires_grad]
