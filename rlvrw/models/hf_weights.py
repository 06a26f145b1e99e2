"""Reading the tensors of a Hugging Face weights directory, whichever of its formats it uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face weights directory, whichever of its formats it uses."""
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_torch)):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in loader(path / shard).items()}
    if (path / "model.safetensors").is_file():
        return _load_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return _load_torch(path / "pytorch_model.bin")
    raise ValueError(f"path {str(path)!r} holds no model.safetensors, pytorch_model.bin or their sharded index")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file))


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)
