"""The two logits passes (``logits_forward``, ``logits_backward``) for each backend, behind one signature.

Specs and signatures: ``rlvrw.reference.logprobs``. The CUDA pair wraps the ops that ``rlvrw._C`` registers. Every pair
takes (N, V) or (B, T, V) logits with unit stride along V and any other strides.
"""

from __future__ import annotations

import types

import torch


def _cuda_forward(logits, tokens, inv_temperature, with_entropy):
    logp, lse, entropy = torch.ops.rlvrw.logits_forward(logits, tokens.long(), float(inv_temperature), with_entropy)
    return logp, lse, (entropy if with_entropy else None)


def _cuda_backward(logits, tokens, inv_temperature, lse, grad_logp, entropy=None, grad_entropy=None, out=None):
    if out is None:
        from rlvrw.kernels.logprobs import empty_rows_like

        out = empty_rows_like(logits)  # rows at the logits' offsets modulo 16 bytes: vector stores as the loads
    grad_logp = grad_logp.float().contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float().contiguous()
    torch.ops.rlvrw.logits_backward_(
        logits, tokens.long(), float(inv_temperature), lse, grad_logp, entropy, grad_entropy, out
    )
    return out


_cuda = types.SimpleNamespace(logits_forward=_cuda_forward, logits_backward=_cuda_backward)


def logits_passes(backend: str):
    """The module-like object with ``logits_forward`` and ``logits_backward`` for ``backend``."""
    if backend == "reference":
        from rlvrw.reference import logprobs

        return logprobs
    if backend == "triton":
        from rlvrw.kernels import logprobs

        return logprobs
    return _cuda
