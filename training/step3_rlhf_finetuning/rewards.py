"""Every source of the answers' reward behind one interface, so the PPO loop knows no task.

A `RewardSource` scores a rollout: given the prompts (B, P), prompt + answer ids (B, P + A),
their attention mask, the answers' mask (B, A) and optionally the data rows behind the answers
(experience.Rows), it returns one score per answer, (B,). `score_answers` checks that shape.
Sources here: the reward model (DeepSpeed-Chat's), the bundled task's checker (`--reward_source
checker`), a plain tensor function (`reward_fn`, the programmatic rewards of the API), a text
reward function (`--reward_fn`, utils/rewards.py) and the weighted sum of several of these,
which also hands back each one's scores for the `reward_<name>` metrics. `ground_truth_for`
offers the bundled task's checker as a metric (gt_score) when the prompts are that task's.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from training.step3_rlhf_finetuning.config import Step3Config, reward_model_used, reward_names
from training.step3_rlhf_finetuning.experience import Experience, Rows, decode_rollout, decoded
from utils.config import ConfigError
from utils.data import tasks
from utils.data.tasks import TaskFamily
from utils.model.forward import position_ids_from_mask
from utils.model.reward_model import end_scores
from utils.rewards import RewardFunction, combine, load_reward_functions, weights_for

# reward_fn(prompts (B, P), seq (B, P + A), attention_mask (B, P + A), action_mask (B, A)) -> (B,)
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Parts = dict[str, list]  # reward name -> its score (float, or None: does not apply) of each answer


class RewardSource(ABC):
    """Scores whole answers; see the module docstring."""

    @abstractmethod
    def score(self, prompts: torch.Tensor, seq: torch.Tensor, attention_mask: torch.Tensor,
              action_mask: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        """(B,) scores of the B answers; `rows`: the data rows behind them, when known."""


def score_answers(source: RewardSource, prompts, seq, attention_mask, action_mask,
                  rows: Rows | None = None) -> torch.Tensor:
    """The source's (B,) float scores on the rollout's device; any other shape is an error."""
    return scored_parts(source, prompts, seq, attention_mask, action_mask, rows)[0]


def scored_parts(source: RewardSource, prompts, seq, attention_mask, action_mask,
                 rows: Rows | None = None) -> tuple[torch.Tensor, Parts]:
    """score_answers, and each reward's own scores when the source weighs several (else {})."""
    if isinstance(source, WeightedSources):
        scores, parts = source.score_parts(prompts, seq, attention_mask, action_mask, rows)
    else:  # a source written before `rows` existed takes four arguments
        takes_rows = "rows" in inspect.signature(source.score).parameters
        scores = source.score(prompts, seq, attention_mask, action_mask, **({"rows": rows} if takes_rows else {}))
        parts = {}
    scores = torch.as_tensor(scores)
    if scores.shape != (seq.size(0),):
        raise ValueError(f"{type(source).__name__} returned scores of shape {tuple(scores.shape)} for "
                         f"{seq.size(0)} answers: it must return one score per answer, shape ({seq.size(0)},)")
    return scores.to(seq.device).float(), parts


class RewardModelSource(RewardSource):
    """The reward model's score at each answer's last real token (DeepSpeed-Chat)."""

    def __init__(self, reward_engine):
        self.model = reward_engine

    def score(self, prompts, seq, attention_mask, action_mask, rows=None) -> torch.Tensor:
        values = self.model(seq, attention_mask, position_ids=position_ids_from_mask(attention_mask))
        return end_scores(values, attention_mask)


class FunctionSource(RewardSource):
    """A programmatic reward: a RewardFn over the rollout's tensors."""

    def __init__(self, fn: RewardFn):
        self.fn = fn

    def score(self, prompts, seq, attention_mask, action_mask, rows=None) -> torch.Tensor:
        return self.fn(prompts, seq, attention_mask, action_mask)


class CheckerSource(RewardSource):
    """`--reward_source checker`: the task family's checker score of each answer, in [0, 1]
    (utils.data.tasks; the bundled family unless another is given). A prompt the checker cannot
    parse (cut from the left by --max_prompt_seq_len) stops the run: scoring it 0 would teach
    the policy something false."""

    def __init__(self, tokenizer, family: TaskFamily | None = None):
        self.tokenizer, self.family = tokenizer, family or tasks.family("bundled")

    def score(self, prompts, seq, attention_mask, action_mask, rows=None) -> torch.Tensor:
        texts, answers = decode_rollout(self.tokenizer, prompts, seq, action_mask)
        for text in texts:
            if not self.family.is_task_prompt(text):
                raise ConfigError(f"--reward_source checker cannot score the prompt {text[-80:]!r}: it is not a "
                                  f"whole {self.family.name} task prompt (raise --max_prompt_seq_len)")
        return torch.tensor(self.family.score_batch(texts, answers))


class TextFunctionSource(RewardSource):
    """A `--reward_fn` (utils.rewards.RewardFunction) on the decoded prompts and answers, with each
    answer's row columns and origin; its checks stop the run with one line naming the function
    and the row."""

    def __init__(self, fn: RewardFunction, tokenizer):
        self.fn, self.tokenizer = fn, tokenizer

    def score_each(self, prompts, seq, action_mask, rows: Rows | None) -> list[float | None]:
        """The function's score of each answer, None where it does not apply."""
        texts, answers = decode_rollout(self.tokenizer, prompts, seq, action_mask)
        rows = rows if rows is not None else Rows.unknown(len(answers))
        return self.fn(texts, answers, rows.columns, rows.origins)

    def score(self, prompts, seq, attention_mask, action_mask, rows=None) -> torch.Tensor:
        each = self.score_each(prompts, seq, action_mask, rows)
        origins = rows.origins if rows is not None else Rows.unknown(len(each)).origins
        return torch.tensor(combine({self.fn.name: each}, {self.fn.name: 1.0}, origins))


class WeightedSources(RewardSource):
    """Several rewards as one: per answer, the weighted sum of those that apply (utils.rewards.combine).
    `score_parts` also returns each reward's own scores, for its metric."""

    def __init__(self, sources: dict[str, RewardSource], weights: dict[str, float]):
        self.sources, self.weights = sources, weights

    def score_parts(self, prompts, seq, attention_mask, action_mask, rows: Rows | None = None):
        parts = {}
        for name, source in self.sources.items():
            if isinstance(source, TextFunctionSource):
                parts[name] = source.score_each(prompts, seq, action_mask, rows)
            else:
                parts[name] = score_answers(source, prompts, seq, attention_mask, action_mask, rows).tolist()
        origins = rows.origins if rows is not None else Rows.unknown(seq.size(0)).origins
        return torch.tensor(combine(parts, self.weights, origins)), parts

    def score(self, prompts, seq, attention_mask, action_mask, rows=None) -> torch.Tensor:
        return self.score_parts(prompts, seq, attention_mask, action_mask, rows)[0]


Given = RewardSource | RewardFn | RewardFunction | Sequence[RewardFunction] | None


def reward_source(given: Given, reward_engine, cfg: Step3Config | None = None, tokenizer=None) -> RewardSource:
    """What scores a trainer's rollouts. A RewardSource or tensor function given replaces every
    other reward. Reward functions given (or cfg's --reward_fn) are weighed with cfg's
    --reward_weights, with the reward model or checker as cfg says (reward_model_used). Else
    the checker (--reward_source checker) or the engine's reward model."""
    if isinstance(given, RewardSource):
        return given
    if given is not None and not isinstance(given, (RewardFunction, list, tuple)):
        return FunctionSource(given)
    functions = ([given] if isinstance(given, RewardFunction) else _functions(given) if given is not None
                 else load_reward_functions(cfg.reward_fn) if cfg is not None else [])
    reward_source_flag = cfg.reward_source if cfg is not None else "model"
    model_used = reward_model_used(reward_source_flag, bool(functions), cfg.reward_model_name_or_path if cfg else "")
    if model_used and reward_engine is None:
        raise ValueError("the engine has no reward model (--reward_source checker or --reward_fn): pass a reward_fn")
    base = (CheckerSource(tokenizer, tasks.family_of(cfg.data_path) if cfg is not None else None)
            if reward_source_flag == "checker" else
            RewardModelSource(reward_engine) if model_used else None)
    weights = cfg.reward_weights if cfg is not None else []
    if not functions and not weights:
        return base
    names = reward_names([f.name for f in functions], reward_source_flag, model_used)
    sources = [TextFunctionSource(f, tokenizer) for f in functions] + ([base] if base is not None else [])
    return WeightedSources(dict(zip(names, sources)), weights_for(names, weights))


def _functions(given: Sequence) -> list[RewardFunction]:
    if not all(isinstance(f, RewardFunction) for f in given):
        raise TypeError("reward_fn as a list takes utils.rewards.RewardFunction items (load_reward_functions)")
    names = [f.name for f in given]
    if len(set(names)) < len(names):  # their scores and metrics are kept by name
        raise ValueError(f"two reward functions share a name ({', '.join(names)}): load them together with "
                         "utils.rewards.load_reward_functions, which names them apart")
    return list(given)


class GroundTruth:
    """Mean checker score of a round's answers (the task family's prompts only): the number that
    says whether the policy really got better, not only the reward's view of it."""

    def __init__(self, tokenizer, family: TaskFamily | None = None):
        self.tokenizer, self.family = tokenizer, family or tasks.family("bundled")

    def __call__(self, exps: list[Experience]) -> dict:
        scores = []
        for exp in exps:
            for prompt, answer in zip(*decoded(self.tokenizer, exp)):
                if self.family.is_task_prompt(prompt):  # a prompt cut from the left no longer parses
                    scores.append(self.family.score(prompt, answer))
        return {"gt_score": sum(scores) / len(scores) if scores else float("nan")}


def ground_truth_for(data_path: list[str], tokenizer) -> GroundTruth | None:
    """The gt_score metric when every prompt source is one bundled task family (the same on every rank)."""
    family = tasks.family_of(data_path)
    return GroundTruth(tokenizer, family) if family is not None else None
