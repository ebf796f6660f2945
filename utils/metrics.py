"""Training metrics: one JSON line per record, optional TensorBoard, PNG curves at the end.

Only rank 0 writes; other ranks get a logger whose calls do nothing, so training code
never branches on the rank to log.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

from utils.fs import atomic_write_text


class MetricsLogger:
    def __init__(self, log_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 tensorboard_dir: str | Path | None = None):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(tensorboard_dir or self.log_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Resuming from a checkpoint at `step`: drop records logged after it (the crashed run
        got further than its last checkpoint) and reload the rest for the final curves."""
        if not self.enabled:
            return
        self._jsonl.close()
        path = self.log_dir / "metrics.jsonl"
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step] if path.is_file() else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))  # a crash keeps the old log
        self.history.clear()
        for row in kept:
            for key, value in row.items():
                if key not in ("step", "time"):
                    self.history[key].append((row["step"], value))
        self._jsonl = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(v) for k, v in metrics.items() if v is not None}
        for key, value in values.items():
            self.history[key].append((step, value))
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self._jsonl.flush()

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        if plot and self.history:
            plot_curves(self.history, self.log_dir / "curves.png")
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def plot_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One small panel per metric, against the step at which it was logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(history)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*history[name])
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
