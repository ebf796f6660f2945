"""The verifiable task families by --data_path name, so callers ask `family_of(data_path)`
instead of hard-coding "bundled".

A family checks its own prompts (`is_task_prompt`, `score`, `score_batch`, `task_of`,
`question_of`, all parsing the prompt text) and gives its fixed held-out questions (`held_out`),
the split no step trains on whatever its --seed, and its prose (`plain_text_corpus`).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

from utils.config import ConfigError
from utils.data import bundled, constraints


@dataclass(frozen=True)
class TaskFamily:
    name: str  # the --data_path name
    module: ModuleType

    def is_task_prompt(self, prompt: str) -> bool:
        return self.module.is_task_prompt(prompt)

    def score(self, prompt: str, response: str) -> float:
        return self.module.score(prompt, response)

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.module.score_batch(prompts, responses)

    def question_of(self, prompt: str) -> str:
        return self.module.question_of(prompt)

    def task_of(self, prompt: str) -> str:
        return self.module.task_of(prompt)

    def plain_text_corpus(self) -> list[str]:
        """Prose in the family's vocabulary (its ptx text: --unsupervised_dataset_name NAME)."""
        return self.module.plain_text_corpus()

    def held_out(self, num: int) -> list[str]:
        """The first `num` questions of the fixed test split (plain text, no wrapper)."""
        from utils.data.sources import load_raw_dataset
        rows = load_raw_dataset(self.name, seed=0).eval[:num]  # the split ignores the seed
        return [self.question_of(row["prompt"]) for row in rows]


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (TaskFamily("bundled", bundled),
                                                        TaskFamily("bundled-constraints", constraints))}


def family(name: str) -> TaskFamily:
    """The family called `name`; ConfigError for any other name."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown task family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of(data_path: str | Sequence[str]) -> TaskFamily | None:
    """The family of a --data_path (one entry or a list): None unless every entry is that family."""
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    names = set(paths)
    if len(names) != 1 or paths[0] not in FAMILIES:
        return None
    return FAMILIES[paths[0]]


def family_of_prompt(prompt: str) -> TaskFamily | None:
    """The family whose checker parses `prompt` (raw or wrapped), or None."""
    return next((f for f in FAMILIES.values() if f.is_task_prompt(prompt)), None)
