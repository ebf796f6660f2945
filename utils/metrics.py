"""Training metrics: one JSON line per record, optional TensorBoard, PNG curves at the end
(curves.png: the main curves; curves_all.png: every metric).

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

    def entries_in(self, folder: str | Path) -> tuple[str, ...]:
        """The names of `folder`'s entries this logger writes into (the TensorBoard events when
        --tensorboard_path is the output folder itself, as DeepSpeed-Chat's scripts set it, or a
        folder inside it), flushed to disk: a final save that replaces `folder` carries them over."""
        if self._tb is None:
            return ()
        self._tb.flush()
        folder, tb = Path(folder).resolve(), Path(self._tb.log_dir).resolve()
        if tb == folder:
            return tuple(sorted(p.name for p in folder.glob("events.out.tfevents.*")))
        return (tb.relative_to(folder).parts[0],) if tb.is_relative_to(folder) else ()

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


# curves.png: the few curves a user reads first, one large panel each, shown when logged.
# (title, y label, log scale, ((metric, legend label), ...)); every metric: <name>_all.png.
MAIN_PANELS = (
    ("Reward", "score per answer", False, (("train/reward", "reward"),)),
    ("KL to the reference", "KL per answer", False, (("train/kl", "KL"),)),
    ("Ground-truth score", "checker score (0 to 1)", False, (("train/gt_score", "ground truth"),)),
    ("Loss", "loss", False, (("train/loss", "train"), ("eval/loss", "held-out"), ("train/actor_loss", "actor"),
                             ("train/critic_loss", "critic"), ("train/unsup_loss", "ptx"))),
    ("Held-out perplexity", "perplexity (log scale)", True, (("eval/perplexity", "held-out"),)),
    ("Pair accuracy", "accuracy", False, (("train/accuracy", "train"), ("eval/accuracy", "held-out"))),
    ("Learning rate", "learning rate", False, (("train/lr", "lr"), ("train/lr_actor", "actor"),
                                               ("train/lr_critic", "critic"))),
)


def main_panels(names) -> list[tuple]:
    """The MAIN_PANELS of which at least one metric was logged, each with only the logged ones;
    without any (a log of other metrics only), one panel per metric."""
    panels = [(title, ylabel, log, present) for title, ylabel, log, lines in MAIN_PANELS
              if (present := tuple((key, label) for key, label in lines if key in names))]
    return panels or one_panel_each(names)


def one_panel_each(names) -> list[tuple]:
    """A panel per metric, titled with its name."""
    return [(name, "", False, ((name, name),)) for name in sorted(names)]


def plot_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """`path` (curves.png): the main panels, large, with titles, axis labels and legends;
    `<stem>_all.png` beside it: every logged metric, one small panel each."""
    path = Path(path)
    xlabel = "PPO round" if "train/reward" in history else "optimizer step"
    _plot_panels(history, main_panels(history), path, xlabel, size=(5.5, 4), fontsize=13)
    _plot_panels(history, one_panel_each(history), path.with_name(f"{path.stem}_all{path.suffix}"), xlabel,
                 size=(4.5, 3), fontsize=9)


def _plot_panels(history, panels, path: Path, xlabel: str, size, fontsize: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax, (title, ylabel, log, lines) in zip(axes.flat, panels):
        for key, label in lines:
            steps, values = zip(*history[key])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=fontsize)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel, fontsize=fontsize - 2)
        ax.set_ylabel(ylabel, fontsize=fontsize - 2)
        if log:
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend(fontsize=fontsize - 3)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics log. A last line without its newline is a write a kill cut
    short (each record is written whole, newline last): it is left out, not parsed."""
    text = Path(path).read_text(encoding="utf-8")
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]
