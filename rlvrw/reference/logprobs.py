"""Reference token log-probabilities: the spec for ``kernels/logprobs.py`` and ``csrc/logits_*.cu``.

Two levels live here:

* ``token_logprobs`` / ``linear_token_logprobs``: the public ops, written the obvious way (``log_softmax``, gather,
  ``-sum p log p``). What the tests treat as ground truth (in float64); their backward is autograd's gradient of that
  math written out (checked against numerical derivatives by ``gradcheck``), which saves one (N, V) buffer instead of
  autograd's two and defines the cases below that autograd leaves to NaN.
* ``logits_forward`` / ``logits_backward``: the pair of primitives every backend implements (one pass over the logits
  forward, one pass backward). The chunked ``linear_token_logprobs`` in ``rlvrw.ops`` is built from them, and on CPU it
  uses these.

With ``z = logits / temperature``, ``lse = logsumexp(z)`` and ``p = softmax(z)``::

    logp    = z[token] - lse
    entropy = lse - sum_j p_j z_j
    dlogits = (g_logp * (onehot(token) - p) - g_entropy * p * (z - lse + entropy)) / temperature

Math is float32 for half/bfloat16/float32 inputs and float64 for float64 inputs. Rows are the last dimension: logits
(..., V), e.g. (N, V) or (B, T, V) with any strides. Conventions, the same on every backend:

* A row whose logits are all -inf has lse = logp = -inf, entropy = 0 and p = 0 (no NaN).
* A row whose upstream gradients (of logp, and of entropy when it is used) are both 0 gets a gradient of exactly 0,
  whatever its logits hold: a masked position never turns NaN or inf logits into a NaN gradient.
* NaN logits in a row that does get a gradient propagate to NaN outputs and gradients.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for an input dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(logits: torch.Tensor, inv_temperature: float, copy: bool = False) -> torch.Tensor:
    """``logits * inv_temperature`` in the compute dtype; skips the (N, V) pass when there is nothing to do."""
    z = logits.to(compute_dtype(logits.dtype), copy=copy)
    return z if inv_temperature == 1.0 else z * inv_temperature


def _zero_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` with the rows flagged in ``rows`` (x.shape[:-1]) set to 0, in place. On CPU the (N, V) pass is skipped
    when no row is flagged; on a GPU it always runs (asking would be a host sync)."""
    if x.is_cuda or bool(rows.any()):
        x.masked_fill_(rows.unsqueeze(-1), 0)
    return x


def _log_softmax(z: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(z)`` over the last dimension, with log p = -inf (p = 0) in rows that are all -inf (NaN in torch).
    ``row_max``: ``z.amax(-1)`` when the caller has it."""
    log_p = torch.log_softmax(z, dim=-1)
    if row_max is None:
        row_max = z.amax(dim=-1)
    empty = row_max == float("-inf")
    if log_p.is_cuda or bool(empty.any()):
        log_p.masked_fill_(empty.unsqueeze(-1), float("-inf"))
    return log_p


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    # A -inf logit has p = 0 and log p = -inf; selecting 0 there keeps the value finite.
    return -(p * torch.where(p > 0, log_p, 0)).sum(-1)


def _gather(log_p: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return log_p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def _softmax_grad(
    log_p: torch.Tensor,
    tokens: torch.Tensor,
    g_logp: torch.Tensor,
    entropy: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    overwrite: bool,
) -> torch.Tensor:
    """d(sum g_logp * logp + g_entropy * entropy)/dz from ``log_p = log softmax(z)``:
    ``g_logp * (onehot - p) - g_entropy * p * (log p + entropy)``, and 0 in rows where every upstream gradient is 0.
    ``overwrite``: ``log_p`` may be overwritten (saves an (N, V) buffer)."""
    g = g_logp.to(log_p.dtype)
    dead = g == 0
    if g_entropy is None:
        grad = (log_p.exp_() if overwrite else log_p.exp()).mul_(-g.unsqueeze(-1))
    else:
        g_ent = g_entropy.to(log_p.dtype)
        dead &= g_ent == 0
        p = log_p.exp()
        # p = 0 (a -inf logit): log p is -inf, and 0 * -inf must not leak NaN into the gradient.
        weight = torch.where(p > 0, log_p, 0).add_(entropy.to(log_p.dtype).unsqueeze(-1)).mul_(g_ent.unsqueeze(-1))
        grad = p.mul_(weight.add_(g.unsqueeze(-1))).neg_()
    grad.scatter_add_(-1, tokens.long().unsqueeze(-1), g.unsqueeze(-1))
    return _zero_rows(grad, dead)


class _TokenLogprobs(torch.autograd.Function):
    """``log_softmax(z)[tokens]`` and, when asked, the entropy of ``softmax(z)``, saving one (N, V) buffer (autograd
    through log_softmax + gather saves two and makes one more pass over the logits; bench/test_bench_logprobs.py
    measures the difference)."""

    @staticmethod
    def forward(ctx, z, tokens, with_entropy):
        log_p = _log_softmax(z)
        logp = _gather(log_p, tokens)
        entropy = _entropy(log_p) if with_entropy else logp.new_empty(0)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(log_p, tokens, entropy)
        ctx.with_entropy = with_entropy
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises instead of silently giving zeros
    def backward(ctx, grad_logp, grad_entropy):
        log_p, tokens, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros(log_p.shape[:-1], dtype=log_p.dtype, device=log_p.device)
        if not ctx.with_entropy or grad_entropy is None:
            entropy = grad_entropy = None
        # not over the saved buffer: it stays valid for another backward (retain_graph, gradcheck)
        return _softmax_grad(log_p, tokens, grad_logp, entropy, grad_entropy, overwrite=False), None, None


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    """log softmax(logits / temperature)[tokens] over the last dimension; optionally the entropy of that softmax."""
    logp, entropy = _TokenLogprobs.apply(_scaled(logits, 1.0 / temperature), tokens, return_entropy)
    return (logp, entropy) if return_entropy else logp


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """``token_logprobs(hidden @ weight.T, tokens)``, materializing the logits (the spec, not the fast path)."""
    return token_logprobs(hidden @ weight.t(), tokens, temperature, return_entropy)


def logits_forward(
    logits: torch.Tensor, tokens: torch.Tensor, inv_temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Primitive: logits (N, V) or (B, T, V), tokens (N,) or (B*T,) -> (logp, lse, entropy or None), each (N,) in the
    compute dtype."""
    z = _scaled(logits, inv_temperature)
    row_max = z.amax(dim=-1)
    log_p = _log_softmax(z, row_max)
    logp = _gather(log_p, tokens.reshape(logits.shape[:-1]))
    # log_p = z - lse everywhere, so at the row's maximum: lse = max(z) - max(log_p) (two reads, no (N, V) write);
    # in an all -inf row both maxima are -inf, and lse is -inf by convention
    lse = torch.where(row_max == float("-inf"), row_max, row_max - log_p.amax(dim=-1))
    entropy = _entropy(log_p).reshape(-1) if with_entropy else None
    return logp.reshape(-1), lse.reshape(-1), entropy


def logits_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    inv_temperature: float,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Primitive: d(loss)/d(logits) from the per-row gradients of logp (and entropy), shaped like the logits; written
    into ``out`` if given (``out`` may be ``logits`` itself), in the dtype of ``logits``."""
    rows = logits.shape[:-1]
    # An all -inf row has lse = -inf: shift it by +inf so that every log p is -inf (p = 0) instead of NaN.
    shift = torch.where(lse == float("-inf"), float("inf"), lse).reshape(rows)
    log_p = _scaled(logits, inv_temperature, copy=True).sub_(shift.unsqueeze(-1))
    grad_z = _softmax_grad(
        log_p, tokens.reshape(rows), grad_logp.reshape(rows),
        None if grad_entropy is None else entropy.reshape(rows),
        None if grad_entropy is None else grad_entropy.reshape(rows),
        overwrite=True,
    )
    if inv_temperature != 1.0:
        grad_z.mul_(inv_temperature)
    if out is None:
        return grad_z.to(logits.dtype)
    return out.copy_(grad_z)
