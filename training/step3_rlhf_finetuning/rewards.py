"""Every source of the answers' reward behind one interface, so the PPO loop knows no task.

A `RewardSource` scores a rollout: given the prompts (B, P), prompt + answer ids (B, P + A),
their attention mask and the answers' mask (B, A), it returns one score per answer, (B,).
`score_answers` checks that shape. Sources here: the reward model (DeepSpeed-Chat's), the
bundled task's checker (`--reward_source checker`), and a plain function (`reward_fn`, the
programmatic rewards of the API). `ground_truth_for` offers the bundled task's checker as a
metric (gt_score) when the prompts are that task's.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from training.step3_rlhf_finetuning.experience import Experience, decode_rollout, decoded
from utils.config import ConfigError
from utils.data import bundled
from utils.model.forward import position_ids_from_mask
from utils.model.reward_model import end_scores

# reward_fn(prompts (B, P), seq (B, P + A), attention_mask (B, P + A), action_mask (B, A)) -> (B,)
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RewardSource(ABC):
    """Scores whole answers; see the module docstring."""

    @abstractmethod
    def score(self, prompts: torch.Tensor, seq: torch.Tensor, attention_mask: torch.Tensor,
              action_mask: torch.Tensor) -> torch.Tensor:
        """(B,) scores of the B answers."""


def score_answers(source: RewardSource, prompts, seq, attention_mask, action_mask) -> torch.Tensor:
    """The source's (B,) float scores on the rollout's device; any other shape is an error."""
    scores = torch.as_tensor(source.score(prompts, seq, attention_mask, action_mask))
    if scores.shape != (seq.size(0),):
        raise ValueError(f"{type(source).__name__} returned scores of shape {tuple(scores.shape)} for "
                         f"{seq.size(0)} answers: it must return one score per answer, shape ({seq.size(0)},)")
    return scores.to(seq.device).float()


class RewardModelSource(RewardSource):
    """The reward model's score at each answer's last real token (DeepSpeed-Chat)."""

    def __init__(self, reward_engine):
        self.model = reward_engine

    def score(self, prompts, seq, attention_mask, action_mask) -> torch.Tensor:
        values = self.model(seq, attention_mask, position_ids=position_ids_from_mask(attention_mask))
        return end_scores(values, attention_mask)


class FunctionSource(RewardSource):
    """A programmatic reward: a RewardFn over the rollout's tensors."""

    def __init__(self, fn: RewardFn):
        self.fn = fn

    def score(self, prompts, seq, attention_mask, action_mask) -> torch.Tensor:
        return self.fn(prompts, seq, attention_mask, action_mask)


class CheckerSource(RewardSource):
    """`--reward_source checker`: the bundled task's checker score of each answer, in [0, 1].
    A prompt the checker cannot parse (cut from the left by --max_prompt_seq_len) stops the
    run: scoring it 0 would teach the policy something false."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def score(self, prompts, seq, attention_mask, action_mask) -> torch.Tensor:
        texts, answers = decode_rollout(self.tokenizer, prompts, seq, action_mask)
        for text in texts:
            if not bundled.is_task_prompt(text):
                raise ConfigError(f"--reward_source checker cannot score the prompt {text[-80:]!r}: it is "
                                  "not a whole bundled task prompt (raise --max_prompt_seq_len)")
        return torch.tensor(bundled.score_batch(texts, answers))


def reward_source(given: RewardSource | RewardFn | None, reward_engine) -> RewardSource:
    """What scores a trainer's rollouts: the source or function given, else the engine's reward
    model (an engine built without one needs a source)."""
    if isinstance(given, RewardSource):
        return given
    if given is not None:
        return FunctionSource(given)
    if reward_engine is None:
        raise ValueError("the engine has no reward model (--reward_source checker): pass a reward_fn")
    return RewardModelSource(reward_engine)


def configured_source(name: str, tokenizer) -> RewardSource | None:
    """The source `--reward_source` names, when it is not the engine's reward model."""
    return CheckerSource(tokenizer) if name == "checker" else None


class GroundTruth:
    """Mean checker score of a round's answers (bundled task prompts only): the number that says
    whether the policy really got better, not only the reward model's view of it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, exps: list[Experience]) -> dict:
        scores = []
        for exp in exps:
            for prompt, answer in zip(*decoded(self.tokenizer, exp)):
                if bundled.is_task_prompt(prompt):  # a prompt cut from the left no longer parses
                    scores.append(bundled.score(prompt, answer))
        return {"gt_score": sum(scores) / len(scores) if scores else float("nan")}


def ground_truth_for(data_path: list[str], tokenizer) -> GroundTruth | None:
    """The gt_score metric when every prompt source is the bundled task (the same on every rank)."""
    return GroundTruth(tokenizer) if all(path == "bundled" for path in data_path) else None
