"""Rollouts of the video world model: G sampled responses per prompt, on the device, with a static KV cache.

    sampler = GroupSampler(model, layout, group_size=16, max_prompts=16, temperature=1.0)
    rollout = sampler.sample(prompts, known, seed=1234)     # prompts (B, P), known (B, R): build()'s true responses
    rollout.ids      # (B*G, P+R) whole sequences; prompt b's samples are rows b*G .. b*G+G-1
    rollout.logp     # (B*G, R) float32: each response token's log-prob under the distribution it was drawn from
    rollout.mask     # (B*G, R) bool: the sampled (frame) positions; elsewhere the token was copied from ``known``

How one chunk of at most ``max_prompts`` prompts is sampled (gpt-fast's loop, driven by the layout's tables):

1. ``model.prefill(prompts)`` runs the B prompts once and ``model.expand_cache(G)`` copies each one's keys and values
   to its G slots: no prompt is run G times.
2. Response position 0 is drawn from the prefill's last logits; then, R - 1 times, one ``decode_step`` feeds the
   previous token and the next position is drawn. A position is drawn (``LayoutTables.loss_mask``) or copied from
   ``known`` (EOS; in multi-step layouts the true actions after each predicted frame, which thereby enter the KV cache
   directly, with no second prefill). The last response token is never fed back: nothing reads its keys.
3. Drawing a token: logits / temperature, every id outside the position's legal range [low, high) set to -inf before
   anything else (so an illegal id cannot be drawn; nothing is clamped afterwards), then optionally all but the top k,
   then Gumbel-max: ``argmax(log_softmax(z) + g)`` with g ~ Gumbel(0, 1). The log-prob returned is
   ``log_softmax(z)`` at the drawn id: the log-prob of that restricted, tempered (and truncated) distribution.

Everything stays on the device and nothing reads a value back to the host: the step's position lives in a device
tensor that the step itself increments, the per-position tables are indexed with it, and the Gumbel noise is a hash of
(seed, row, position, token id) computed with integer tensor ops (``gumbel_noise``) rather than a stateful
generator. On a GPU the decode-and-draw step is captured once per row count in a CUDA graph and replayed R - 1 times
(``cuda_graph=True``); on CPU the same code runs eagerly. Because the noise depends only on (seed, global row,
position, id), a rollout is reproducible across resumes, chunkings and data-parallel splits: rank r passes
``first_row`` = its first global row, and every row draws what it would have drawn in one process.

Log-probs and the trainer: the trainer (``rlvrw.train.trainer``) scores sampled tokens under the same distribution,
restricted to the legal range and tempered (its forward runs the output layer on the frame-token rows only). So
``rollout.logp`` equals the trainer's recomputation up to the rounding of the decode path (bf16 on a GPU), except
with ``top_k``, which the trainer does not apply (as VERL scores top-k rollouts without the truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvrw.data.sequences import SequenceLayout
from rlvrw.models.transformer import WorldModelTransformer
from rlvrw import checks

MASK32 = 0xFFFFFFFF
# Mueller's 32-bit hash multiplier. It is below 2**27, so a product with a 32-bit value fits in int64 without wrapping.
HASH_MULTIPLIER = 0x45D9F3B
UNIFORM_BITS = 23  # float32 holds (k + 0.5) / 2**23 exactly for every k, so u is never 0 or 1 and log(u) is finite


# ----------------------------------------------------------------------------------------------------------------------
# Drawing tokens
# ----------------------------------------------------------------------------------------------------------------------


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, twice) of int64 tensors holding values in [0, 2**32): a bijection in
    which every output bit depends on every input bit. Exact integer math, so CPU and GPU agree bit for bit."""
    x = ((x >> 16) ^ x) * HASH_MULTIPLIER & MASK32
    x = ((x >> 16) ^ x) * HASH_MULTIPLIER & MASK32
    return (x >> 16) ^ x


def gumbel_noise(seed: torch.Tensor, rows: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise (n, vocab_size) float32, a pure function of (seed, row, position, token id).

    seed: (1,) int64 in [0, 2**32); rows (n,) int64 global row indices; position (1,) int64. Counter-based, like
    Philox: no generator state to carry through CUDA graphs, checkpoints or ranks.
    """
    key = mix32(mix32(mix32(seed) ^ rows) ^ position)  # (n,)
    ids = torch.arange(vocab_size, device=rows.device)
    bits = mix32(key[:, None] ^ ids) >> (32 - UNIFORM_BITS)
    uniform = (bits.float() + 0.5) * 2.0**-UNIFORM_BITS
    return -torch.log(-torch.log(uniform))


def sample_tokens(
    logits: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    temperature: float,
    top_k: int,
    seed: torch.Tensor,
    rows: torch.Tensor,
    position: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``softmax(logits / temperature)`` restricted to ids in [low, high) (and to the
    ``top_k`` largest when ``top_k`` > 0), by Gumbel-max with ``gumbel_noise(seed, rows, position)``.

    logits (n, V); low, high: (1,) int64 tensors. Returns (tokens (n,) int64, log-probs (n,) float32 of the drawn
    tokens under that restricted distribution). No host sync.
    """
    ids = torch.arange(logits.shape[-1], device=logits.device)
    scaled = (logits.float() / temperature).masked_fill((ids < low) | (ids >= high), float("-inf"))
    if top_k:
        kth_largest = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    logp = scaled.log_softmax(dim=-1)
    tokens = (logp + gumbel_noise(seed, rows, position, logits.shape[-1])).argmax(dim=-1)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """G responses per prompt, on the device (see the module doc)."""

    ids: torch.Tensor  # (B*G, seq_len) int64: prompt then response
    logp: torch.Tensor  # (B*G, R) float32: sampling log-probs; 0 where the token was copied
    mask: torch.Tensor  # (B*G, R) bool: sampled positions (the layout's response loss mask)


class GroupSampler:
    """Samples ``group_size`` fixed-length responses per prompt from ``model`` along ``layout`` (see the module doc).

    The sampler owns ``model``'s KV cache (``max_prompts * group_size`` rows, ``seq_len - 1`` positions, in the
    model's dtype; allocated here), and its CUDA graphs write into that very cache: give it a model of its own (e.g.
    a bf16 copy of the policy that the trainer keeps in step), or at least never call ``setup_cache`` or
    ``free_cache`` on the model while the sampler is in use. ``max_prompts``: prompts per pass; ``sample`` takes
    any number and goes through them in chunks. ``cuda_graph``: capture the decode step on a GPU (ignored on CPU).
    ``top_k`` 0 means no truncation.
    """

    def __init__(
        self,
        model: WorldModelTransformer,
        layout: SequenceLayout,
        group_size: int = 16,
        *,
        max_prompts: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        cuda_graph: bool = True,
    ):
        if not isinstance(model, WorldModelTransformer):
            raise ValueError(f"model must be a WorldModelTransformer, got {type(model).__name__}")
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"layout must be a SequenceLayout, got {type(layout).__name__}")
        for name, value in (("group_size", group_size), ("max_prompts", max_prompts)):
            checks.integer(name, value)
        checks.positive("temperature", temperature)
        checks.integer("top_k", top_k, low=0)
        if model.config.vocab_size < layout.vocab_size:
            raise ValueError(f"model's vocab_size ({model.config.vocab_size}) is smaller than the layout's "
                             f"({layout.vocab_size})")
        if layout.seq_len - 1 > model.config.max_position_embeddings:
            raise ValueError(f"layout sequences ({layout.seq_len} tokens) exceed the model's max_position_embeddings "
                             f"({model.config.max_position_embeddings})")
        self.model, self.layout, self.group_size = model, layout, group_size
        self.max_prompts, self.temperature = max_prompts, float(temperature)
        self.top_k = min(top_k, model.config.vocab_size)
        device = model.lm_head.weight.device
        self.device = device
        self.use_graphs = cuda_graph and device.type == "cuda"
        rows, length = max_prompts * group_size, layout.response_len
        model.setup_cache(rows, layout.seq_len - 1)
        self.tables = layout.response_tables(device)  # built here: the first build copies from the host
        # the static state of a decode step: a CUDA graph reads and writes these very tensors
        self.token = torch.zeros(rows, dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)
        self.rows = torch.zeros(rows, dtype=torch.int64, device=device)
        self.known = torch.zeros(rows, length, dtype=torch.int64, device=device)
        self.responses = torch.zeros(rows, length, dtype=torch.int64, device=device)
        self.logp = torch.zeros(rows, length, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    # ---- one position ------------------------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor) -> None:
        """Fill response position j = pos + 1 - P of the first n = len(logits) rows from the next-token logits:
        drawn where the layout samples, copied from ``known`` elsewhere; then make it the token to feed."""
        n = logits.shape[0]
        j = self.pos + 1 - self.layout.prompt_len
        # a draw at every position, kept only where the layout samples: one static graph serves every position
        low, high = self.tables.low.index_select(0, j), self.tables.high.index_select(0, j)
        drawn, drawn_logp = sample_tokens(logits, low, high, self.temperature, self.top_k, self.seed,
                                          self.rows[:n], j)
        sampled = self.tables.loss_mask.index_select(0, j)
        token = torch.where(sampled, drawn, self.known[:n].index_select(1, j)[:, 0])
        self.responses[:n].index_copy_(1, j, token[:, None])
        self.logp[:n].index_copy_(1, j, torch.where(sampled, drawn_logp, 0.0)[:, None])
        self.token[:n].copy_(token)
        self.pos += 1

    def _advance(self, n: int) -> None:
        """Feed the first n rows' current token at ``pos`` and fill the next response position."""
        self._choose(self.model.decode_step(self.token[:n], self.pos))

    def _capture(self, n: int) -> torch.cuda.CUDAGraph:
        """Record ``_advance(n)`` in a CUDA graph. Runs it once first on a side stream (capture needs warmed-up
        kernels); that run moves the state one position on, which the caller undoes."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._advance(n)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._advance(n)
        return graph

    # ---- a whole rollout ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, known: torch.Tensor, seed: int, first_row: int = 0) -> Rollout:
        """G responses for each of the B prompts (B, P); ``known`` (B, R) holds the tokens of the positions that are
        copied (``layout.split(layout.build(...))[1]``: its frame tokens are ignored). ``seed`` in [0, 2**32) and
        ``first_row`` (this caller's first row in a larger batch) fix the Gumbel noise of every row. All on the
        model's device; returns a ``Rollout`` of new tensors."""
        layout, group = self.layout, self.group_size
        self._check_inputs(prompts, known, seed, first_row)
        batch = prompts.shape[0]
        ids = torch.empty(batch * group, layout.seq_len, dtype=torch.int64, device=self.device)
        logp = torch.empty(batch * group, layout.response_len, dtype=torch.float32, device=self.device)
        ids[:, : layout.prompt_len] = prompts.repeat_interleave(group, dim=0)
        self.seed.fill_(seed)
        for start in range(0, batch, self.max_prompts):
            chunk = slice(start, min(start + self.max_prompts, batch))
            rows = slice(chunk.start * group, chunk.stop * group)
            n = rows.stop - rows.start
            first_logits = self.model.prefill(prompts[chunk]).repeat_interleave(group, dim=0)
            self.model.expand_cache(group)
            self.known[:n] = known[chunk].repeat_interleave(group, dim=0)
            self.rows[:n] = torch.arange(first_row + rows.start, first_row + rows.stop, device=self.device)
            self.pos.fill_(layout.prompt_len - 1)
            self._choose(first_logits)
            if self.use_graphs and layout.response_len > 1 and n not in self.graphs:
                self.graphs[n] = self._capture(n)
                self.pos.fill_(layout.prompt_len)  # undo the warm-up's step (its cache writes are redone)
                self.token[:n] = self.responses[:n, 0]
            for _ in range(layout.response_len - 1):
                if self.use_graphs:
                    self.graphs[n].replay()
                else:
                    self._advance(n)
            ids[rows, layout.prompt_len :] = self.responses[:n]
            logp[rows] = self.logp[:n]
        mask = self.tables.loss_mask.expand(batch * group, -1)
        return Rollout(ids, logp, mask)

    def _check_inputs(self, prompts, known, seed, first_row) -> None:
        layout = self.layout
        for name, tensor, length in (("prompts", prompts, layout.prompt_len), ("known", known, layout.response_len)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.dim() != 2:
                raise ValueError(f"{name} must be a 2-D int64 tensor, got "
                                 + (f"{tensor.dtype} of shape {tuple(tensor.shape)}"
                                    if isinstance(tensor, torch.Tensor) else type(tensor).__name__))
            if tensor.shape[1] != length:
                raise ValueError(f"{name} must have shape (B, {length}) for this layout, got {tuple(tensor.shape)}")
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device} but the model is on {self.device}")
        if known.shape[0] != prompts.shape[0]:
            raise ValueError(f"known must have one row per prompt ({prompts.shape[0]}), got {known.shape[0]}")
        if prompts.shape[0] == 0:
            raise ValueError("prompts must hold at least one prompt")
        checks.integer("seed", seed, low=0, high=MASK32)
        checks.integer("first_row", first_row, low=0)
        if first_row + prompts.shape[0] * self.group_size > MASK32:
            raise ValueError(f"first_row + rows must stay below 2**32 (the noise's row counter), got {first_row}")
