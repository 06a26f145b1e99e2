"""Per-token log-probabilities (and entropies) from logits, or from hidden states and the output-layer weight."""

from __future__ import annotations

import functools
import math

import torch

from rlvrw import reference
from rlvrw import checks
from rlvrw.ops import _backend
from rlvrw.ops._primitives import logits_passes


def _logits_key(logits: torch.Tensor) -> tuple:
    rows = math.prod(logits.shape[:-1])
    return (logits.dtype, _backend.size_class(rows), _backend.size_class(logits.shape[-1]))


def logits_rows(logits: torch.Tensor) -> torch.Tensor:
    """The (N, V) or (B, T, V) logits as the logits passes take them: unit stride along V, any other strides (a
    ``[:, :-1]`` slice is not copied); a copy only when V itself is strided."""
    return logits if logits.stride(-1) == 1 or logits.shape[-1] <= 1 else logits.contiguous()


def resolve_logits_backend(op: str, logits: torch.Tensor, tokens1d: torch.Tensor, backend: str | None) -> str:
    """Backend for an op whose heavy part is the logits passes: on a GPU, race the forward pass of each."""

    def race(name):
        passes = logits_passes(name)
        return lambda: passes.logits_forward(logits_rows(logits), tokens1d, 1.0, False)

    return _backend.resolve(op, logits.device, backend, race=race, race_key=_logits_key(logits))


class TokenLogprobsFunction(torch.autograd.Function):
    """logits (N, V) or (B, T, V) -> logp (N,) and entropy (N,) (empty unless asked), with the backend's two logits
    passes."""

    @staticmethod
    def forward(ctx, logits, tokens, inv_temperature, with_entropy, inplace_backward, backend):
        passes = logits_passes(backend)
        logp, lse, entropy = passes.logits_forward(logits, tokens, inv_temperature, with_entropy)
        if entropy is None:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.passes, ctx.inv_temperature, ctx.with_entropy = passes, inv_temperature, with_entropy
        ctx.inplace_backward = inplace_backward
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, tokens, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if not ctx.with_entropy:
            entropy = grad_entropy = None
        elif grad_entropy is None:
            entropy = None
        grad_logits = ctx.passes.logits_backward(
            logits, tokens, ctx.inv_temperature, lse, grad_logp, entropy, grad_entropy,
            out=logits if ctx.inplace_backward else None,
        )
        return grad_logits, None, None, None, None, None


def _check_logits_tokens(logits, tokens, logits_name="logits"):
    checks.tensor(logits_name, logits, dims=(2, 3))
    checks.tensor("tokens", tokens, dtypes=checks.INDEX_DTYPES)
    checks.shape("tokens", tokens, logits.shape[:-1], f"{logits_name}.shape[:-1]")
    if logits.shape[-1] == 0:
        raise ValueError(f"{logits_name} must have a vocabulary (last) dimension of size >= 1, "
                         f"got shape {tuple(logits.shape)}")
    checks.same_device(**{logits_name: logits, "tokens": tokens})


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    inplace_backward: bool = False,
    backend: str | None = None,
):
    """``log softmax(logits / temperature)[tokens]``, optionally with the entropy of that softmax.

    logits (N, V) or (B, T, V) in any float dtype, tokens matching (…,) int64/int32. Returns float32 (float64 for
    float64 logits) log-probs, and entropies when ``return_entropy``. Math is float32 at least, with an online
    log-sum-exp over V in one pass. Strided logits such as ``logits[:, :-1]`` of a model's (B, T + 1, V) output are
    read where they are, not copied. ``inplace_backward=True`` lets the backward write d(logits) over the logits
    (saving an (N, V) buffer): only when nothing else needs the logits after this call. A position whose log-prob
    (and entropy) gets no gradient gets a zero d(logits) row, whatever its logits hold.
    """
    _check_logits_tokens(logits, tokens)
    temperature = checks.number("temperature", temperature, low=0, low_open=True)
    return_entropy = checks.boolean("return_entropy", return_entropy)
    vocab = logits.shape[-1]
    checks.token_ids("tokens", tokens, vocab)
    tokens1d = tokens.reshape(-1)
    name = resolve_logits_backend("token_logprobs", logits, tokens1d, backend)
    if name == "reference":
        return reference.token_logprobs(logits, tokens, temperature, return_entropy)
    logp, entropy = TokenLogprobsFunction.apply(
        logits_rows(logits), tokens1d, 1.0 / temperature, return_entropy, inplace_backward, name
    )
    shape = logits.shape[:-1]
    return (logp.view(shape), entropy.view(shape)) if return_entropy else logp.view(shape)


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: at most 2**28 logits in flight (512 MiB in bf16), at least 256 rows so the matmuls stay
    efficient."""
    return max(1, min(n_rows, max(256, (1 << 28) // max(vocab, 1))))


def _autocast_off(method):
    """Run an autograd Function's forward or backward (its first tensor argument after ctx or grads decides the
    device) with autocast disabled."""

    @functools.wraps(method)
    def wrapped(ctx, *args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if not torch.amp.is_autocast_available(device.type):  # meta tensors (the ahead-of-time compile check)
            return method(ctx, *args)
        with torch.autocast(device.type, enabled=False):
            return method(ctx, *args)

    return wrapped


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H) -> logp (N,), entropy; logits exist one chunk of rows at a time.

    Backward recomputes each chunk's logits (one extra matmul: 8*N*H*V flops in all) instead of keeping them, except
    when everything fits in one chunk: then that chunk's logits are kept, which costs no more memory than the forward
    already used. d(weight) accumulates in the weight's dtype, chunk by chunk, as addmm does. Both passes run with
    autocast off, in the inputs' dtype (``linear_token_logprobs`` casts them to autocast's dtype first), so forward
    and backward see the same logits.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, tokens, inv_temperature, with_entropy, chunk_rows, backend):
        passes = logits_passes(backend)
        n = hidden.shape[0]
        acc = reference.logprobs.compute_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        logits = None  # no chunk at all when there are no rows
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            logits = hidden[rows] @ weight.t()
            logp[rows], lse[rows], ent = passes.logits_forward(logits, tokens[rows], inv_temperature, with_entropy)
            if with_entropy:
                entropy[rows] = ent
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.kept_logits = logits if n <= chunk_rows else None
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
        ctx.passes, ctx.inv_temperature, ctx.with_entropy, ctx.chunk_rows = (
            passes, inv_temperature, with_entropy, chunk_rows,
        )
        return logp, entropy

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, n))
            logits = ctx.kept_logits if ctx.kept_logits is not None else hidden[rows] @ weight.t()
            grad_logits = ctx.passes.logits_backward(
                logits, tokens[rows], ctx.inv_temperature, lse[rows], grad_logp[rows],
                entropy[rows] if use_entropy else None, grad_entropy[rows] if use_entropy else None, out=logits,
            )
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
        ctx.kept_logits = None
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    chunk_rows: int | None = None,
    backend: str | None = None,
):
    """``token_logprobs(hidden @ weight.T, tokens, temperature)`` without ever holding the (N, V) logits.

    hidden (N, H) or (B, T, H), weight (V, H) (an ``nn.Linear`` output layer's weight, no bias), tokens (N,) or
    (B, T). Rows are processed ``chunk_rows`` at a time (default: ``default_chunk_rows``); backward returns d(hidden)
    and d(weight). No rows (N = 0, or T = 0) give empty log-probs and zero gradients.
    """
    checks.tensor("hidden", hidden, dims=(2, 3))
    checks.tensor("weight", weight, dims=(2,))
    if torch.amp.is_autocast_available(hidden.device.type) and torch.is_autocast_enabled(hidden.device.type):
        # as an output Linear under autocast: the matmuls in autocast's dtype (the casts are differentiable)
        low = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(low), weight.to(low)
    checks.tensor("tokens", tokens, dtypes=checks.INDEX_DTYPES)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) (hidden size last), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one row (one per vocabulary entry), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    checks.shape("tokens", tokens, hidden.shape[:-1], "hidden.shape[:-1]")
    checks.same_device(hidden=hidden, weight=weight, tokens=tokens)
    temperature = checks.number("temperature", temperature, low=0, low_open=True)
    return_entropy = checks.boolean("return_entropy", return_entropy)
    vocab = weight.shape[0]
    checks.token_ids("tokens", tokens, vocab)
    hidden2d, tokens1d = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden2d.shape[0], vocab)
    else:
        chunk_rows = checks.integer("chunk_rows", chunk_rows)
    name = _backend.resolve("linear_token_logprobs", hidden.device, backend)
    logp, entropy = LinearTokenLogprobsFunction.apply(
        hidden2d, weight, tokens1d, 1.0 / temperature, return_entropy, chunk_rows, name
    )
    shape = hidden.shape[:-1]
    return (logp.view(shape), entropy.view(shape)) if return_entropy else logp.view(shape)
