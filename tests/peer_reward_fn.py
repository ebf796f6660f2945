"""A test-only reward function in TRL's reward_funcs form: the bundled task's checker."""
from utils.data import bundled


def bundled_checker(prompts, completions, **kwargs):
    return [bundled.score(p, c) for p, c in zip(prompts, completions)]
