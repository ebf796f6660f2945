"""TEMP stub of the task-family registry (the real one comes from the task branch): only
"bundled", over utils.data.bundled and its fixed held-out split."""
from __future__ import annotations

from types import SimpleNamespace

from utils.config import ConfigError
from utils.data import bundled

FAMILIES = ("bundled",)


def _held_out(num: int) -> list[str]:
    from utils.data.sources import load_raw_dataset
    return [bundled.question_of(row["prompt"]) for row in load_raw_dataset("bundled", seed=0).eval[:num]]


def family_of(name: str):
    if name not in FAMILIES:
        raise ConfigError(f"unknown task family {name!r} (one of {', '.join(FAMILIES)})")
    return SimpleNamespace(name=name, is_task_prompt=bundled.is_task_prompt, score=bundled.score,
                           score_batch=bundled.score_batch, question_of=bundled.question_of,
                           task_of=bundled.task_of, held_out=_held_out)
