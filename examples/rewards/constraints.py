"""Reward for the `bundled-constraints` family: the fraction of the prompt's rules the answer meets.

The row's `constraints` column (JSON text or a list of dicts) is used when given, so the rules
need not be re-read from a prompt that a chat template or truncation changed; without it the
prompt text is parsed. None marks a prompt that is not a constraints task.
"""
from __future__ import annotations

from utils.data import constraints as task


def constraints_reward(prompts, completions, constraints=None, **kwargs) -> list[float | None]:
    rules = constraints if constraints is not None else [None] * len(prompts)
    if not len(prompts) == len(completions) == len(rules):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and "
                         f"{len(rules)} constraints: they must be aligned")
    out = []
    for prompt, answer, rule in zip(prompts, completions, rules):
        if rule not in (None, "", []):
            out.append(task.score_constraints(rule, answer))
        elif task.is_task_prompt(prompt):
            out.append(task.score(prompt, answer))
        else:
            out.append(None)
    return out
