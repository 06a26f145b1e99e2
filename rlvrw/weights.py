"""Pretrained weights in rlvrw's cache directory: checked safetensors files.

The cache is ``$RLVRW_CACHE`` or ``~/.cache/rlvrw``. Every file in it is a safetensors file written atomically with a
``<file>.sha256`` beside it (``sha256sum`` format), which readers check. A leaf: the models that read these files
(``rlvrw.models.lpips``) and the converter that writes them (``rlvrw.models.lpips_weights``, ``rlvrw weights
lpips``) import it, never the other way round.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from rlvrw import files
from rlvrw.files import CACHE_ENV, cache_dir  # noqa: F401 (CACHE_ENV names the variable that moves the cache)


class WeightsNotFoundError(FileNotFoundError):
    """No weights file where one was looked for; the message names the files and how to get them."""


def lpips_cache_file(net: str, version: str = "0.1") -> Path:
    return cache_dir() / "lpips" / f"{net}-v{version}.safetensors"


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write tensors and their ``.sha256`` atomically (the data first: a file without its checksum is incomplete);
    returns the digest."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()
    files.write_bytes(path, data)
    files.write_bytes(_checksum_file(path), f"{digest}  {path.name}\n".encode())
    return digest


def read_safetensors(path: Path, require_checksum: bool) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking it against its ``.sha256`` (required for cache files,
    checked when present otherwise)."""
    from safetensors.torch import load

    data = path.read_bytes()
    checksum_file = _checksum_file(path)
    if checksum_file.is_file():
        want = (checksum_file.read_text().split() or [""])[0]
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise ValueError(
                f"{path} does not match its checksum in {checksum_file} (sha256 {got}, expected {want}); "
                "delete both and fetch again (rlvrw weights lpips --force)"
            )
    elif require_checksum:
        raise ValueError(
            f"{path} has no {checksum_file.name} beside it (an interrupted write?); fetch again with "
            "rlvrw weights lpips --force"
        )
    return load(data)
