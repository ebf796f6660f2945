"""Why a training loop stops early: a stop signal (StopRequest) or losses that stay NaN/inf (NonFinite)."""
from __future__ import annotations

import math
import signal

from utils import checkpoint, dist
from utils.config import ConfigError


class StopRequest:
    """SIGTERM/SIGINT while training: remember it, so the loop can save a checkpoint at the next
    step boundary and exit cleanly instead of dying mid-update."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether any rank was asked to stop (all ranks must agree, to save together)."""
        return dist.any_rank(self.signal is not None)


class NonFinite:
    """Counts micro-batches skipped for a NaN/inf loss; too many in a row stop the run.

    With `output_dir`, the stop names the newest checkpoint there (or says there is none);
    `advice` ends it (the flags that help, in the step's names)."""

    def __init__(self, limit: int, output_dir: str | None = None,
                 advice: str = "Lower --learning_rate, use --dtype fp32 or --compute_fp32_loss"):
        self.limit, self.in_a_row, self.total = limit, 0, 0
        self.output_dir, self.advice = output_dir, advice

    def _left(self) -> str:
        if self.output_dir is None:
            return "the last checkpoint is intact"
        newest = checkpoint.latest(self.output_dir)
        return (f"the newest checkpoint, {newest}, is intact" if newest else
                "no checkpoint was saved yet")

    def skip(self, value: float, step: int) -> bool:
        if math.isfinite(value):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            raise ConfigError(f"loss was {value} for {self.in_a_row} micro-batches in a row at step {step}; "
                              f"{self._left()}. {self.advice}")
        return True
