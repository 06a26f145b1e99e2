"""Full-float32 matmuls and convolutions for a block of code, whichever of torch's two TF32 switches is in use.

cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa), which costs SSIM its digits (variances are
differences of nearby moments) and puts float32 checks near 1e-3. torch >= 2.9 has per-backend ``fp32_precision``
settings beside the legacy ``allow_tf32`` flags, and refuses to read a legacy flag once the new settings of one
backend disagree, so this switches whichever API the running torch has, and reads nothing else.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def full_fp32(conv: bool = True, matmul: bool = True):
    """Within the block: float32 convolutions (``conv``) and matmuls (``matmul``) in IEEE float32, not TF32."""
    cudnn, cuda_matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    new_api = hasattr(getattr(cudnn, "conv", None), "fp32_precision")
    switches = []
    if conv:
        switches.append((cudnn.conv, "fp32_precision", "ieee") if new_api else (cudnn, "allow_tf32", False))
    if matmul:
        switches.append((cuda_matmul, "fp32_precision", "ieee") if new_api else (cuda_matmul, "allow_tf32", False))
    saved = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, value in switches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(switches, saved):
            setattr(owner, name, value)
