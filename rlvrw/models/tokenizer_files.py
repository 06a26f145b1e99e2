"""Tokenizer weights on disk: rlvrw's own checkpoints, and the reference implementation's published ones.

rlvrw's own (written by ``rlvrw tokenizer``): one file holding the state dict and the constructor's arguments. It is a
safetensors file (config in its metadata) when the ``safetensors`` package is installed, else a ``torch.save`` file;
``load_tokenizer`` reads both. Writes go to a temporary file first and then replace the target, so an interrupted
write never leaves a truncated checkpoint. The header records the sha256 of the tensors (``state_digest``: names,
dtypes, shapes and bytes), checked at load: a file that was changed after it was written, truncated, emptied or
garbled is a ``rlvrw.files.CorruptFileError`` naming it, never a model. A tokenizer with a non-finite parameter is
never written.

The reference's (Hugging Face repos ``thuml/rt1-frame-tokenizer`` and ``thuml/rt1-compressive-tokenizer``): diffusers
model directories, ``config.json`` plus ``diffusion_pytorch_model.safetensors`` (or ``.bin``), possibly in a
``tokenizer/`` subfolder. Nothing is downloaded here; a user fetches them where there is network access, e.g.
``huggingface-cli download thuml/rt1-frame-tokenizer --local-dir DIR``, and passes DIR. Their parameter names are those
of diffusers' VAE blocks (``down_blocks.0.resnets.1.conv_shortcut``, ``mid_block.attentions.0.to_q``, ...); the tables
below map them onto ``rlvrw.models.tokenizer``'s modules, and every tensor's shape is checked.

How this was checked without the files: the per-frame mapping is tested against state dicts whose names and shapes
are written out from the published architecture (diffusers ``Encoder`` / ``Decoder`` with the CNNFSQModel256 config),
and, where diffusers is installed, by loading a randomly initialised diffusers ``Encoder`` and ``Decoder`` and
comparing outputs. The compressive mapping follows the layout of iVideoGPT's ``CompressiveVQModel`` (``encoder``,
``cond_encoder`` with ``cross_att_blocks`` of ``nn.MultiheadAttention``, ``decoder``, ``cond_decoder``,
``quant_conv`` / ``post_quant_conv`` for the context frame and ``quant_linear`` / ``post_quant_linear`` for the
patches), from which RLVR-World's FSQ variant descends; it is tested the same way, but the published compressive
checkpoint itself could not be inspected, so a mismatch there surfaces as a clear error naming the parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from rlvrw import files
from rlvrw.files import CorruptFileError
from rlvrw.guard import check_finite_state
from rlvrw.models.tokenizer import CompressiveTokenizer, FrameTokenizer
from rlvrw.usage import UsageError

FORMAT = "rlvrw-tokenizer"
TOKENIZER_CLASSES = {"FrameTokenizer": FrameTokenizer, "CompressiveTokenizer": CompressiveTokenizer}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HF_REPOS = {FrameTokenizer: "thuml/rt1-frame-tokenizer", CompressiveTokenizer: "thuml/rt1-compressive-tokenizer"}
# the reference's fsq_levels config may be a bit budget (log2 of the codebook size); the FSQ paper's level sets
FSQ_LEVELS_BY_BITS = {8: [8, 6, 5], 10: [8, 5, 5, 5], 12: [7, 5, 5, 5, 5], 14: [8, 8, 8, 6, 5], 16: [8, 8, 8, 5, 5, 5]}


# ----------------------------------------------------------------------------------------------------------------------
# rlvrw's own checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a state dict, in name order: each name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tokenizer(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` (a FrameTokenizer or CompressiveTokenizer) with its config and the digest of its tensors,
    atomically. ``extra``: JSON-able notes kept beside the config (training settings, metrics). Returns the path
    written."""
    name = type(model).__name__
    if name not in TOKENIZER_CLASSES:
        raise ValueError(f"model must be one of {sorted(TOKENIZER_CLASSES)}, got {name}")
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    check_finite_state(state.items(), f"tokenizer {path}")
    header = {"format": FORMAT, "class": name, "config": model.config, "extra": extra or {},
              "sha256": state_digest(state)}
    if safetensors_available():
        from safetensors.torch import save

        files.write_bytes(path, save(state, metadata={"rlvrw": json.dumps(header)}))
    else:
        files.write_file(path, lambda f: torch.save({"rlvrw": header, "state_dict": state}, f))
    return path


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then the JSON header ('{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise ImportError(f"{path} is a safetensors file; reading it needs the safetensors package "
                          "(pip install safetensors)") from err
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (safe_open has no __iter__)


class TokenizerNotFoundError(FileNotFoundError, UsageError):
    """No tokenizer checkpoint where the user said."""


def load_tokenizer(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """A tokenizer saved by ``save_tokenizer`` (either file format), in eval mode, its tensors checked against the
    digest it was written with (files written before digests were recorded load unchecked)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerNotFoundError(f"no tokenizer checkpoint at {path}; write one with `rlvrw tokenizer --out "
                                     f"{path}`")
    try:
        if _is_safetensors(path):
            state, metadata = _read_safetensors(path)
            if "rlvrw" not in metadata:
                raise UsageError(f"path {path} is a safetensors file without rlvrw's header; for the reference's "
                                 "checkpoints use load_pretrained_frame_tokenizer / "
                                 "load_pretrained_compressive_tokenizer")
            header = json.loads(metadata["rlvrw"])
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or "rlvrw" not in payload:
                raise UsageError(f"path {path} is not an rlvrw tokenizer checkpoint")
            header, state = payload["rlvrw"], payload["state_dict"]
    except (UsageError, ImportError):
        raise
    except Exception as err:  # safetensors, torch.load and json each fail in their own way on a damaged file
        raise CorruptFileError(f"{path}: cannot be read as a tokenizer checkpoint ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("class") not in TOKENIZER_CLASSES:
        raise UsageError(f"path {path} holds an unknown checkpoint header")
    if "sha256" in header and state_digest(state) != header["sha256"]:
        raise CorruptFileError(f"{path}: corrupt (its tensors' sha256 differs from the one recorded when it was "
                               "written)")
    model = TOKENIZER_CLASSES[header["class"]](**header["config"])
    model.load_state_dict(state)
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------------------------------------------------
# The reference's diffusers-style checkpoints
# ----------------------------------------------------------------------------------------------------------------------

# diffusers VAE names -> rlvrw names, inside an encoder or decoder; (pattern, replacement), applied in order
VAE_RULES = [
    (r"^(down|up)_blocks\.(\d+)\.resnets\.", r"stages.\2.resnets."),
    (r"^(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.", r"stages.\2.resample.conv."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"^mid_block\.resnets\.0\.", "mid.resnet1."),
    (r"^mid_block\.resnets\.1\.", "mid.resnet2."),
    (r"^mid_block\.attentions\.0\.group_norm\.", "mid.attention.norm."),
    (r"^mid_block\.attentions\.0\.(to_q|query)\.", "mid.attention.attention.to_q."),
    (r"^mid_block\.attentions\.0\.(to_k|key)\.", "mid.attention.attention.to_k."),
    (r"^mid_block\.attentions\.0\.(to_v|value)\.", "mid.attention.attention.to_v."),
    (r"^mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", "mid.attention.attention.to_out."),
    (r"^conv_norm_out\.", "norm_out."),
]
FRAME_TOKENIZER_PARTS = {"encoder": "encoder", "decoder": "decoder",
                         "quant_linear": "quant_in", "post_quant_linear": "quant_out"}
COMPRESSIVE_PARTS = {"encoder": "context_encoder", "decoder": "context_decoder",
                     "cond_encoder": "future_encoder", "cond_decoder": "future_decoder",
                     "quant_conv": "context_quant_in", "post_quant_conv": "context_quant_out",
                     "quant_linear": "future_quant_in", "post_quant_linear": "future_quant_out"}
CROSS_ATTENTION_RULES = [(r"\.q_pos_emb$", ".q_pos"), (r"\.kv_pos_emb$", ".kv_pos"),
                         (r"\.att\.out_proj\.", ".attention.to_out.")]


def _vae_name(name: str) -> str:
    for pattern, replacement in VAE_RULES:
        name = re.sub(pattern, replacement, name)
    return name


def _cross_attention_names(module: nn.Module) -> list[str]:
    """The module's cross-attention keys in the order they run (the reference's ``cross_att_blocks`` order)."""
    keys = list(getattr(module, "cross_attentions", {}).keys())
    return sorted(keys, key=lambda k: -1 if k == "mid" else int(k))


def convert_reference_state_dict(state: dict, model: nn.Module) -> dict:
    """The reference's state dict (diffusers names) -> ``model``'s names. Packed ``nn.MultiheadAttention``
    projections are split into q, k, v; legacy 1x1-conv attention weights are flattened. Unknown names are kept as
    they are, so ``load_state_dict`` reports them."""
    parts = COMPRESSIVE_PARTS if isinstance(model, CompressiveTokenizer) else FRAME_TOKENIZER_PARTS
    converted = {}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        if part not in parts:
            converted[name] = tensor
            continue
        target = parts[part]
        cross = re.match(r"cross_att_blocks\.(\d+)\.(.*)$", rest)
        if cross:
            order = _cross_attention_names(getattr(model, target))
            index = int(cross.group(1))
            if index >= len(order):
                converted[name] = tensor  # more blocks than this architecture has: reported as unexpected
                continue
            rest = f"cross_attentions.{order[index]}.{cross.group(2)}"
            if rest.endswith(("att.in_proj_weight", "att.in_proj_bias")):
                stem, kind = rest.rsplit(".att.in_proj_", 1)
                for projection, chunk in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                    converted[f"{target}.{stem}.attention.{projection}.{kind}"] = chunk
                continue
            for pattern, replacement in CROSS_ATTENTION_RULES:
                rest = re.sub(pattern, replacement, rest)
        else:
            rest = _vae_name(rest)
        if re.search(r"attention\.to_[qkv]\.weight$|attention\.to_out\.weight$", rest) and tensor.dim() == 4:
            tensor = tensor.flatten(1)  # early diffusers stored the mid attention's projections as 1x1 convs
        converted[f"{target}.{rest}" if rest else target] = tensor
    return converted


def load_reference_state_dict(model: nn.Module, state: dict, source: str = "the state dict") -> nn.Module:
    """Convert and load ``state`` into ``model``, checking that every name and shape matches."""
    converted = convert_reference_state_dict(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    wrong = [f"{k}: {tuple(converted[k].shape)} vs {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(converted)) if converted[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def head(items):
            return ", ".join(items[:8]) + (f" (and {len(items) - 8} more)" if len(items) > 8 else "")

        raise ValueError(
            f"{source} does not fit {type(model).__name__}({model.config}):"
            + (f" missing {len(missing)}: {head(missing)};" if missing else "")
            + (f" unexpected {len(unexpected)}: {head(unexpected)};" if unexpected else "")
            + (f" wrong shapes: {head(wrong)}" if wrong else "")
        )
    model.load_state_dict(converted)
    return model


def _model_dir(path: Path, cls: type) -> tuple[Path, Path]:
    """(config.json, weights file) under ``path`` or ``path/tokenizer``; FileNotFoundError saying how to get them."""
    for folder in (path, path / "tokenizer"):
        config = folder / "config.json"
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if config.is_file() and weights is not None:
            return config, weights
    raise FileNotFoundError(
        f"no reference tokenizer in {path}: expected config.json and one of {', '.join(WEIGHT_FILES)} there or in "
        f"{path / 'tokenizer'}. Download {HF_REPOS[cls]} where there is network access "
        f"(huggingface-cli download {HF_REPOS[cls]} --local-dir DIR) and copy DIR here."
    )


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    return torch.load(path, map_location="cpu", weights_only=True)


def _levels(config: dict) -> list[int]:
    levels = config.get("fsq_levels", 12)
    if isinstance(levels, int):
        if levels not in FSQ_LEVELS_BY_BITS:
            raise ValueError(f"config fsq_levels={levels}: no level set known for that bit budget "
                             f"(known: {sorted(FSQ_LEVELS_BY_BITS)})")
        return FSQ_LEVELS_BY_BITS[levels]
    return list(levels)


def _vae_config(config: dict, source: Path) -> dict:
    for key, expected in (("in_channels", 3), ("out_channels", 3), ("act_fn", "silu"), ("norm_type", "group")):
        if config.get(key, expected) != expected:
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (rlvrw's tokenizers have {expected!r})")
    return {"channels": list(config.get("block_out_channels", (128, 256, 256, 512, 768))),
            "layers_per_block": int(config.get("layers_per_block", 2)),
            "latent_channels": int(config.get("latent_channels", 64)),
            "levels": _levels(config),
            "num_groups": int(config.get("norm_num_groups", 32))}


def load_pretrained_frame_tokenizer(path: str | os.PathLike) -> FrameTokenizer:
    """The reference per-frame tokenizer (``CNNFSQModel256``, HF ``thuml/rt1-frame-tokenizer``) from a local
    directory, in eval mode."""
    config_file, weights_file = _model_dir(Path(path), FrameTokenizer)
    model = FrameTokenizer(**_vae_config(json.loads(config_file.read_text()), config_file))
    return load_reference_state_dict(model, _read_weights(weights_file), str(weights_file)).eval()


def load_pretrained_compressive_tokenizer(path: str | os.PathLike,
                                          frame_size: tuple[int, int] = (256, 320)) -> CompressiveTokenizer:
    """The reference compressive tokenizer (HF ``thuml/rt1-compressive-tokenizer``) from a local directory, in eval
    mode. ``frame_size``: the frames it was trained on (RT-1: 256x320); its config records only one side."""
    config_file, weights_file = _model_dir(Path(path), CompressiveTokenizer)
    config = json.loads(config_file.read_text())
    if config.get("context_length", 1) != 1:
        raise ValueError(f"{config_file}: context_length={config['context_length']}; rlvrw's CompressiveTokenizer "
                         "takes one context frame")
    model = CompressiveTokenizer(frame_size=frame_size, **_vae_config(config, config_file),
                                 patch_size=int(config.get("patch_size", 4)),
                                 attention_max_side=int(config.get("max_att_resolution", 40)))
    return load_reference_state_dict(model, _read_weights(weights_file), str(weights_file)).eval()
