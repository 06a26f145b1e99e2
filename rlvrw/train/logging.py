"""Run logs: one JSON line per logged step (always), TensorBoard scalars (when wanted and installed), and a tqdm
progress bar; all from rank 0 only, so that N processes write one log.

    log = RunLogger(run_dir, total_steps=1000, start_step=step)
    log.log(step, {"loss": 2.3, "lr": 3e-4, "tokens_per_s": 51200.0})   # metrics.jsonl, TensorBoard, the bar
    log.advance()                                                          # one step done
    log.close()

``metrics.jsonl`` lines are ``{"step": s, "time": unix seconds, **metrics}``. A resumed run appends to the same file
after dropping the lines of steps past the one it resumes from (the interrupted run's last steps, which it redoes;
all of them when it starts from step 0), so the file holds each step once. TensorBoard gets the same scalars in
``run_dir/tensorboard`` (``purge_step`` drops the redone steps there too). It needs the ``tensorboard`` package:
``tensorboard="auto"`` uses it when installed, "on" insists, "off" never does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from rlvrw.train import distributed
from rlvrw import files

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_CHOICES = ("auto", "on", "off")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, in order (a torn last line, from a killed run, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite the JSONL file at ``path`` without the records of steps after ``step``."""
    kept = [record for record in read_metrics(path.parent) if record.get("step", 0) <= step]
    text = "".join(json.dumps(record) + "\n" for record in kept)
    files.write_bytes(path, text.encode())


def _summary_writer(log_dir: Path, mode: str, purge_step: int):
    """A TensorBoard ``SummaryWriter``, or None when ``mode`` is "off" or ("auto") tensorboard is not installed."""
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        if mode == "on":
            raise ValueError("tensorboard='on' needs the tensorboard package: pip install tensorboard") from err
        logger.info("tensorboard is not installed: logging to %s only", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


class RunLogger:
    """Metrics of a run to ``run_dir``; a no-op on ranks other than 0 (or when ``enabled`` is False).

    ``progress_keys``: the metrics shown beside the progress bar (all of them when None).
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        *,
        tensorboard: str = "auto",
        progress: bool = True,
        progress_keys: tuple[str, ...] | None = None,
        enabled: bool | None = None,
    ):
        if tensorboard not in TENSORBOARD_CHOICES:
            raise ValueError(f"tensorboard must be one of {list(TENSORBOARD_CHOICES)}, got {tensorboard!r}")
        self.enabled = distributed.is_main() if enabled is None else enabled
        self.progress_keys = progress_keys
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = self.bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            _drop_records_after(self.path, start_step)
        self.writer = _summary_writer(self.path.parent / TENSORBOARD_DIR, tensorboard, purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        """Record ``metrics`` (names -> numbers) at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)
        if self.bar is not None:
            keys = self.progress_keys if self.progress_keys is not None else metrics.keys()
            self.bar.set_postfix({k: format_value(metrics[k]) for k in keys if k in metrics}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line for the user, printed above the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        self.writer = self.bar = None
