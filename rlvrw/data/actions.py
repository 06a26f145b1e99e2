"""Per-dimension action statistics and the uniform 256-bin action discretizer of RLVR-World.

A world model sees actions as ids: each dimension of an action ``a`` is mapped to a bin with

    id = floor(clip((a - min) / (max - min + 1e-8), 0, 1) * 256), clipped to [0, 255]

where ``min`` and ``max`` are that dimension's extremes over the training split. Values outside [min, max] (from the
test split, or from another data set) land in the first or last bin; ``max`` itself lands in bin 255. A dimension
that never varies (max == min) maps min to bin 0 and anything above it to bin 255.

The arithmetic runs in float64 whatever the input dtype, so numpy and torch inputs give the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlvrw import checks, files

NUM_BINS = 256
RANGE_EPS = 1e-8  # keeps the division finite for a dimension that never varies


@dataclass(frozen=True)
class ActionStats:
    """Per-dimension minimum and maximum of the actions of a data set's training split.

    ``low`` and ``high`` are float64 arrays of shape (A,); ``num_episodes`` and ``num_steps`` say how much data they
    were computed from.
    """

    low: np.ndarray
    high: np.ndarray
    num_episodes: int
    num_steps: int

    def __post_init__(self):
        low = np.asarray(self.low, dtype=np.float64)
        high = np.asarray(self.high, dtype=np.float64)
        if low.ndim != 1 or low.shape != high.shape or low.size == 0:
            raise ValueError(f"low and high must be non-empty vectors of one shape, got {low.shape} and {high.shape}")
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError("low and high must be finite")
        if (high < low).any():
            raise ValueError(f"high must be >= low in every dimension, got low={low.tolist()} high={high.tolist()}")
        if self.num_episodes < 0 or self.num_steps < 0:
            raise ValueError(f"num_episodes and num_steps must be >= 0, got {self.num_episodes}, {self.num_steps}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def action_dims(self) -> int:
        return int(self.low.size)

    def to_dict(self) -> dict:
        return {
            "low": self.low.tolist(),
            "high": self.high.tolist(),
            "action_dims": self.action_dims,
            "num_episodes": int(self.num_episodes),
            "num_steps": int(self.num_steps),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ActionStats:
        missing = {"low", "high", "num_episodes", "num_steps"} - set(data)
        if missing:
            raise ValueError(f"data is missing the action-statistics keys {sorted(missing)}")
        return cls(np.asarray(data["low"]), np.asarray(data["high"]), int(data["num_episodes"]),
                   int(data["num_steps"]))

    def save(self, path: str | Path) -> None:
        """Write the statistics as JSON, atomically."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        files.write_bytes(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> ActionStats:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def compute_action_stats(action_arrays: Iterable[np.ndarray]) -> ActionStats:
    """Per-dimension min and max over episodes' actions, each (T, A) with the same A."""
    low = high = None
    num_episodes = num_steps = 0
    for actions in action_arrays:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise ValueError(f"action_arrays must hold non-empty (T, A) arrays, got shape {actions.shape}")
        if low is not None and actions.shape[1] != low.size:
            raise ValueError(f"action_arrays mix action sizes {low.size} and {actions.shape[1]}")
        if not np.isfinite(actions).all():
            raise ValueError("action_arrays hold a non-finite action")
        episode_low, episode_high = actions.min(axis=0), actions.max(axis=0)
        low = episode_low if low is None else np.minimum(low, episode_low)
        high = episode_high if high is None else np.maximum(high, episode_high)
        num_episodes += 1
        num_steps += actions.shape[0]
    if low is None:
        raise ValueError("action_arrays is empty: there are no actions to compute statistics from")
    return ActionStats(low, high, num_episodes, num_steps)


class ActionDiscretizer:
    """Maps continuous actions (..., A) to bin ids (..., A) in [0, num_bins), per dimension (see the module doc)."""

    def __init__(self, low, high, num_bins: int = NUM_BINS):
        checks.integer("num_bins", num_bins)
        stats = ActionStats(np.asarray(low), np.asarray(high), 0, 0)  # validates low and high
        self.low = stats.low
        self.high = stats.high
        self.num_bins = num_bins

    @classmethod
    def from_stats(cls, stats: ActionStats, num_bins: int = NUM_BINS) -> ActionDiscretizer:
        return cls(stats.low, stats.high, num_bins)

    @property
    def action_dims(self) -> int:
        return int(self.low.size)

    def __repr__(self) -> str:
        return f"ActionDiscretizer(action_dims={self.action_dims}, num_bins={self.num_bins})"

    def __call__(self, actions):
        """Bin ids of ``actions`` (numpy array or torch tensor, last dimension A): int64, same kind, same device."""
        if isinstance(actions, torch.Tensor):
            self._check_shape(actions.shape)
            if not torch.isfinite(actions).all():
                raise ValueError("actions must be finite")
            low = torch.as_tensor(self.low, device=actions.device)
            span = torch.as_tensor(self.high - self.low + RANGE_EPS, device=actions.device)
            unit = ((actions.to(torch.float64) - low) / span).clamp(0.0, 1.0)
            return torch.floor(unit * self.num_bins).clamp(0, self.num_bins - 1).to(torch.int64)
        actions = np.asarray(actions)
        self._check_shape(actions.shape)
        if not np.issubdtype(actions.dtype, np.number) or not np.isfinite(actions).all():
            raise ValueError("actions must be finite numbers")
        unit = np.clip((actions.astype(np.float64) - self.low) / (self.high - self.low + RANGE_EPS), 0.0, 1.0)
        return np.clip(np.floor(unit * self.num_bins), 0, self.num_bins - 1).astype(np.int64)

    def _check_shape(self, shape) -> None:
        if len(shape) == 0 or shape[-1] != self.action_dims:
            raise ValueError(f"actions must have last dimension {self.action_dims}, got shape {tuple(shape)}")
