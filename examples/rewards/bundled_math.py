"""Reward for the `bundled` family (arithmetic, lists, words): its checker's score in [0, 1]
(1 right, 0.5 right content in the wrong format, 0 wrong); None for any other prompt."""
from __future__ import annotations

from utils.data import bundled


def bundled_math_reward(prompts, completions, **kwargs) -> list[float | None]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [bundled.score(p, c) if bundled.is_task_prompt(p) else None
            for p, c in zip(prompts, completions)]
