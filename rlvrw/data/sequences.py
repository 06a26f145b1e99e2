"""The token sequences of the video world models: where frames, actions, BOS and EOS go, built on the device in batch.

RLVR-World (like iVideoGPT before it) trains a LLaMA on flat sequences of token ids. A ``SequenceLayout`` says where
every token goes. ``build`` turns frame tokens and action bins into id sequences with a few batched tensor ops on the
inputs' device; ``tables`` says, per position, what kind of token goes there, which ids are legal there, and whether
it is trained on, as tensors on a device, for the trainer's loss mask and the sampler.

Single-step prediction (the reference's ``SimpleVideoProcessor``): C context frames of N tokens, each followed by its
action (A dims), then BOS; the response is the next frame and EOS::

    [F_0 A_0] [F_1 A_1] ... [F_{C-1} A_{C-1}] BOS | F_C EOS
    prompt: C*(N+A) + 1 tokens                    | response: N + 1

Multi-step prediction (the reference's ``ContextMultiStepPredictionProcessor`` and its interactive rollout): the M
tokens X of the compressive tokenizer's context frame, then C+K frames of N tokens each followed by its action; no BOS
or EOS. While sampling, the true actions are injected after each predicted frame::

    X [F_0 A_0] ... [F_{C-1} A_{C-1}] | [F_C A_C] ... [F_{C+K-1} A_{C+K-1}]
    prompt: M + C*(N+A)               | response: K*(N+A)

``action_ids[:, k]`` is the action that follows frame k in the sequence (in RLVR-World, the action taken at frame k);
aligning recorded actions with frames is the data reader's business.

Ids, for a frame codebook of S codes and ``action_bins`` bins: frame tokens are codebook indices [0, S); multi-step
context tokens are offset by S; action bins by S (single-step) or 2S (multi-step), every action dimension sharing the
same bins; then BOS, then EOS (which is also the pad id). With DESIGN.md's sizes: single-step 1333 prompt + 321
response tokens, vocab 4633; multi-step 1373 + 651, vocab 9008.

Loss: on the predicted frame tokens only, which are also the only tokens the sampler draws; every other response token
(EOS, the injected actions) is known in advance and is copied from ``build``'s output. (The reference's single-step
pre-training also trains the prediction of BOS and EOS; here their places are fixed by the layout, so they carry no
loss.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rlvrw import checks

# What a position holds: the values of ``LayoutTables.kind``.
FRAME, CONTEXT, ACTION, BOS, EOS = range(5)
KIND_NAMES = ("frame", "context", "action", "bos", "eos")
MODES = ("single_step", "multi_step")


@dataclass(frozen=True)
class LayoutTables:
    """Per-position tables of a layout on one device, all of shape (L,) for a whole sequence or (R,) for a response.

    Shared between callers (they are cached per layout and device): read them, never write into them.
    """

    kind: torch.Tensor  # int64, one of FRAME CONTEXT ACTION BOS EOS
    low: torch.Tensor  # int64: the legal ids at a position are low <= id < high
    high: torch.Tensor  # int64
    loss_mask: torch.Tensor  # bool: a predicted frame token, trained on and sampled; everything else is given


@dataclass(frozen=True)
class SequenceLayout:
    """Where every token of a world-model sequence goes. Build one with ``single_step`` or ``multi_step``."""

    mode: str
    frame_tokens: int  # N: tokens per (predicted or context) frame
    context_frames: int  # C: frames (each with its action) in the prompt after the multi-step context tokens
    action_dims: int  # A
    action_bins: int
    codebook_size: int  # S: ids of the frame tokenizer's codebook
    context_tokens: int = 0  # M: multi-step only, tokens of the compressive tokenizer's context frame
    predicted_frames: int = 1  # K: frames in the response

    @classmethod
    def single_step(
        cls,
        frame_tokens: int = 320,
        context_frames: int = 4,
        action_dims: int = 13,
        action_bins: int = 256,
        codebook_size: int = 4375,
    ) -> SequenceLayout:
        """Predict one frame from C frames and their actions. Defaults: RLVR-World on RT-1 (1333 + 321 tokens)."""
        return cls("single_step", frame_tokens, context_frames, action_dims, action_bins, codebook_size)

    @classmethod
    def multi_step(
        cls,
        context_tokens: int = 1280,
        frame_tokens: int = 80,
        context_frames: int = 1,
        predicted_frames: int = 7,
        action_dims: int = 13,
        action_bins: int = 256,
        codebook_size: int = 4375,
    ) -> SequenceLayout:
        """Predict K frames from a context frame and C frames, true actions in between. Defaults: RLVR-World on
        RT-1 (1373 + 651 tokens)."""
        return cls(
            "multi_step", frame_tokens, context_frames, action_dims, action_bins, codebook_size,
            context_tokens, predicted_frames,
        )

    def __post_init__(self):
        checks.choice("mode", self.mode, MODES)
        for name in ("frame_tokens", "context_frames", "action_dims", "action_bins", "codebook_size",
                     "predicted_frames"):
            checks.integer(name, getattr(self, name))
        if self.mode == "single_step" and (self.context_tokens != 0 or self.predicted_frames != 1):
            raise ValueError("a single_step layout has context_tokens=0 and predicted_frames=1, got "
                             f"context_tokens={self.context_tokens!r}, predicted_frames={self.predicted_frames!r}")
        if self.mode == "multi_step":
            checks.integer("context_tokens", self.context_tokens)

    # ---- ids ---------------------------------------------------------------------------------------------------------
    @property
    def multi(self) -> bool:
        return self.mode == "multi_step"

    @property
    def context_offset(self) -> int:
        """Id of context code 0 (multi-step)."""
        return self.codebook_size

    @property
    def action_offset(self) -> int:
        """Id of action bin 0."""
        return self.codebook_size * (2 if self.multi else 1)

    @property
    def bos_id(self) -> int:
        return self.action_offset + self.action_bins

    @property
    def eos_id(self) -> int:
        return self.bos_id + 1

    @property
    def pad_id(self) -> int:
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.eos_id + 1

    # ---- lengths -----------------------------------------------------------------------------------------------------
    @property
    def chunk_tokens(self) -> int:
        """N + A: a frame and the action that follows it."""
        return self.frame_tokens + self.action_dims

    @property
    def num_frames(self) -> int:
        """Frames in a whole sequence, context and predicted (the multi-step context frame not counted)."""
        return self.context_frames + self.predicted_frames

    @property
    def num_actions(self) -> int:
        """Actions in a whole sequence: one after every frame, except after the single-step prediction."""
        return self.context_frames if not self.multi else self.num_frames

    @property
    def prompt_len(self) -> int:
        if self.multi:
            return self.context_tokens + self.context_frames * self.chunk_tokens
        return self.context_frames * self.chunk_tokens + 1

    @property
    def response_len(self) -> int:
        if self.multi:
            return self.predicted_frames * self.chunk_tokens
        return self.frame_tokens + 1

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def copy_offset(self) -> int:
        """Positions from a predicted frame's token back to the same token of the frame before it: N + A, plus the
        BOS single-step (the world model's copy prior, ``WorldModelConfig.copy_prior_offset``)."""
        return self.chunk_tokens + (0 if self.multi else 1)

    # ---- building sequences ------------------------------------------------------------------------------------------
    def build(
        self,
        frame_ids: torch.Tensor,
        action_ids: torch.Tensor,
        context_ids: torch.Tensor | None = None,
        *,
        check_values: bool = True,
    ) -> torch.Tensor:
        """Whole sequences (B, seq_len) int64, on the inputs' device.

        frame_ids (B, num_frames, N): codebook indices of the context frames, then of the frames to predict (their
        true tokens: training targets, and for the rollout the reward's ground truth; the sampler overwrites them).
        action_ids (B, num_actions, A): action bins in [0, action_bins). context_ids (B, M): multi-step only, codebook
        indices of the context frame. Any integer dtype. ``check_values`` checks that every index is in range, which
        reads the values (a host sync on a GPU); it is skipped during CUDA graph capture.
        """
        batch = self._check_inputs(frame_ids, action_ids, context_ids, check_values)
        frames = frame_ids.long()
        actions = action_ids.long() + self.action_offset
        if self.multi:
            chunks = torch.cat([frames, actions], dim=2).reshape(batch, -1)
            return torch.cat([context_ids.long() + self.context_offset, chunks], dim=1)
        history = torch.cat([frames[:, : self.context_frames], actions], dim=2).reshape(batch, -1)
        bos = frames.new_full((batch, 1), self.bos_id)
        eos = frames.new_full((batch, 1), self.eos_id)
        return torch.cat([history, bos, frames[:, self.context_frames], eos], dim=1)

    def split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt (B, prompt_len), response (B, response_len)) views of whole sequences (B, seq_len)."""
        self._check_tokens("ids", ids, self.seq_len)
        return ids[:, : self.prompt_len], ids[:, self.prompt_len :]

    def next_token_targets(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For teacher-forced training on whole sequences (B, L): (inputs ids[:, :-1], targets ids[:, 1:], loss mask
        (B, L-1) bool), so that the model's output at position t is scored against token t+1 where the mask is set."""
        self._check_tokens("ids", ids, self.seq_len)
        mask = self.tables(ids.device).loss_mask[1:].expand(ids.shape[0], -1)
        return ids[:, :-1], ids[:, 1:], mask

    def prompt_frames(self, prompt: torch.Tensor) -> torch.Tensor:
        """The context frames' tokens (B, C, N) of prompts (B, prompt_len) (a view)."""
        self._check_tokens("prompt", prompt, self.prompt_len)
        start = self.context_tokens if self.multi else 0
        chunks = prompt[:, start : start + self.context_frames * self.chunk_tokens]
        return chunks.unflatten(1, (self.context_frames, self.chunk_tokens))[:, :, : self.frame_tokens]

    def response_frames(self, response: torch.Tensor) -> torch.Tensor:
        """The predicted frames' tokens (B, K, N) of responses (B, response_len) (a view): codebook indices, ready
        for the tokenizer's decoder."""
        self._check_tokens("response", response, self.response_len)
        if self.multi:
            return response.unflatten(1, (self.predicted_frames, self.chunk_tokens))[:, :, : self.frame_tokens]
        return response[:, None, : self.frame_tokens]

    # ---- per-position tables -----------------------------------------------------------------------------------------
    def kinds(self) -> list[int]:
        """What each position of a whole sequence holds (FRAME CONTEXT ACTION BOS EOS), as a list."""
        chunk = [FRAME] * self.frame_tokens + [ACTION] * self.action_dims
        if self.multi:
            return [CONTEXT] * self.context_tokens + chunk * self.num_frames
        return chunk * self.context_frames + [BOS] + [FRAME] * self.frame_tokens + [EOS]

    def tables(self, device: torch.device | str = "cpu") -> LayoutTables:
        """Per-position tables (L,) of a whole sequence on ``device`` (cached)."""
        return _tables(self, torch.device(device))

    def response_tables(self, device: torch.device | str = "cpu") -> LayoutTables:
        """Per-position tables (R,) of the response on ``device`` (cached): for response position j, the legal ids are
        ``low[j] <= id < high[j]``; ``loss_mask[j]`` says the sampler draws it (a frame token), else it is copied
        from ``build``'s output (EOS, injected true actions)."""
        return _response_tables(self, torch.device(device))

    # ---- checks ------------------------------------------------------------------------------------------------------
    def _check_inputs(self, frame_ids, action_ids, context_ids, check_values) -> int:
        _check_index_tensor("frame_ids", frame_ids, 3)
        batch = frame_ids.shape[0]
        expected = {
            "frame_ids": (frame_ids, (batch, self.num_frames, self.frame_tokens), self.codebook_size),
            "action_ids": (action_ids, (batch, self.num_actions, self.action_dims), self.action_bins),
        }
        if self.multi:
            expected["context_ids"] = (context_ids, (batch, self.context_tokens), self.codebook_size)
        elif context_ids is not None:
            raise ValueError("context_ids is for multi_step layouts; this layout is single_step, pass None")
        for name, (tensor, shape, upper) in expected.items():
            if tensor is None:
                raise ValueError(f"{name} is required for a {self.mode} layout, shape {shape}")
            _check_index_tensor(name, tensor, len(shape))
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for this layout, got {tuple(tensor.shape)}")
            if tensor.device != frame_ids.device:
                raise ValueError(f"{name} is on {tensor.device} but frame_ids is on {frame_ids.device}")
            if check_values and not _capturing(tensor) and tensor.numel():
                low, high = int(tensor.min()), int(tensor.max())
                if low < 0 or high >= upper:
                    raise ValueError(f"{name} must lie in [0, {upper}), got values in [{low}, {high}]")
        return batch

    def _check_tokens(self, name, ids, length):
        _check_index_tensor(name, ids, 2)
        if ids.shape[1] != length:
            raise ValueError(f"{name} must have shape (B, {length}) for this layout, got {tuple(ids.shape)}")


def _check_index_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@functools.cache
def _tables(layout: SequenceLayout, device: torch.device) -> LayoutTables:
    kind = torch.tensor(layout.kinds(), dtype=torch.int64, device=device)
    s, a = layout.codebook_size, layout.action_offset
    # indexed by kind: FRAME CONTEXT ACTION BOS EOS
    low_of_kind = torch.tensor([0, s, a, layout.bos_id, layout.eos_id], device=device)
    high_of_kind = torch.tensor([s, 2 * s, a + layout.action_bins, layout.bos_id + 1, layout.eos_id + 1],
                                device=device)
    in_response = torch.arange(layout.seq_len, device=device) >= layout.prompt_len
    return LayoutTables(kind, low_of_kind[kind], high_of_kind[kind], (kind == FRAME) & in_response)


@functools.cache
def _response_tables(layout: SequenceLayout, device: torch.device) -> LayoutTables:
    whole = _tables(layout, device)
    p = layout.prompt_len
    return LayoutTables(whole.kind[p:], whole.low[p:], whole.high[p:], whole.loss_mask[p:])
