"""A format rule to combine with a checker: 0 for answers of at most MAX_WORDS words, minus
PENALTY per extra word (down to -1), so a policy is not paid for rambling past the point."""
from __future__ import annotations

MAX_WORDS = 40
PENALTY = 0.05


def length_reward(prompts, completions, max_words: int = MAX_WORDS, **kwargs) -> list[float]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [0.0 - min(1.0, PENALTY * max(0, len(c.split()) - max_words)) for c in completions]
