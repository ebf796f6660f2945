"""Best-of-N: sample N answers to each prompt, score them with a reward, keep the highest.

The diagnostic behind it: if the answer a reward picks out of N samples of the SFT model is no
better on the ground truth than the greedy answer, training the policy on that reward (Step 3)
will not be either. So the reward is the one Step 3 would use: a Step 2 reward model (its value
at the last real token of prompt + answer ids, the answer up to and including its first eos, as
Step 3 scores a rollout), reward functions (utils.rewards: prompt and answer text as Step 3
decodes them, the row's other columns, weighted and combined), or the task's checker.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch

from utils.config import ConfigError
from utils.model.forward import position_ids_from_mask
from utils.model.reward_model import end_scores
from utils.rl_math import answer_mask
from utils.rewards import RewardFunction, combine, weights_for


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 8  # rows per generate call; a prompt's N rows always go together
    seed: int = 1234

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"--best_of must be at least 1, got {self.n}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0 to sample, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Rollout:
    """A batch of sampled answers in Step 3's layout (its reward model reads exactly this)."""
    prompts: torch.Tensor         # (B, P) left-padded prompt ids, each prompt's N rows together
    seq: torch.Tensor             # (B, P + A) prompt + generated ids
    attention_mask: torch.Tensor  # (B, P + A) real prompt tokens + answer up to its first eos
    action_mask: torch.Tensor     # (B, A)


@dataclass
class Choice:
    """The N answers to one prompt, their rewards, the kept one and (gradable) ground truth."""
    answers: list[str]
    rewards: list[float]
    parts: dict[str, list[float | None]]  # each reward's own scores, before weighting
    best: int
    scores: list[float] | None = None  # ground truth of each answer

    @property
    def best_score(self) -> float:
        return self.scores[self.best]

    @property
    def oracle_score(self) -> float:
        return max(self.scores)

    @property
    def sampled_score(self) -> float:
        return statistics.fmean(self.scores)


def pick_best(rewards: Sequence[float]) -> int:
    """Index of the highest reward; on a tie the first (max keeps the first maximum)."""
    if not rewards:
        raise ValueError("no answers to pick from")
    return max(range(len(rewards)), key=rewards.__getitem__)


@dataclass
class Reward:
    """What ranks the N answers: a reward model, the task's checker and/or reward functions,
    combined by utils.rewards.combine with one weight per part in `names`' order (all 1 by default)."""
    model_path: str = ""
    functions: Sequence[RewardFunction] = ()
    weights: Sequence[float] = ()
    checker: object = None  # a task family (utils.data.tasks) whose score is the reward
    _model: object = field(default=None, repr=False)

    def __post_init__(self):
        if not self.names:
            raise ConfigError("--best_of needs a reward to rank the answers: --reward_model PATH "
                              "and/or --reward_fn SPEC")
        self.weight_of = weights_for(self.names, self.weights)

    @property
    def names(self) -> list[str]:
        # Step 3's order (its --reward_weights): the functions, then the reward model or checker
        return ([f.name for f in self.functions] + (["reward_model"] if self.model_path else [])
                + (["checker"] if self.checker else []))

    def describe(self) -> str:
        parts = [f"{w:g} x {n}" if len(self.names) > 1 else n for n, w in self.weight_of.items()]
        return " + ".join(parts) + (f" ({self.model_path})" if self.model_path else "")

    def check_tokenizer(self, tokenizer, policy: str) -> None:
        """The reward model reads the policy's token ids: one line if its tokenizer differs."""
        if self.model_path:
            from utils.model import require_same_tokenizer
            require_same_tokenizer(tokenizer, self.model_path, "reward model", f"the policy ({policy})")

    def reward_model(self, tokenizer, device):
        if self._model is None:
            from utils.model import load_reward_model
            self._model = load_reward_model(self.model_path, tokenizer, dtype=torch.float32, dropout=0.0).eval()
        return self._model.to(device)

    def score(self, tokenizer, batch: Rollout, questions: list[str], columns: list[dict],
              origins: list[str]) -> tuple[list[float], dict[str, list[float | None]]]:
        """(combined reward per row, each part's scores per row)."""
        parts = {}
        if self.model_path:
            parts["reward_model"] = reward_model_scores(self.reward_model(tokenizer, batch.seq.device), batch)
        prompts, answers = decode(tokenizer, batch)
        if self.checker:  # Step 3's checker: the question and the answer as decoded there
            parts["checker"] = self.checker.score_batch(questions, answers)
        for fn in self.functions:
            parts[fn.name] = fn(prompts, answers, columns, origins)
        return combine(parts, self.weight_of, origins), parts


@torch.no_grad()
def reward_model_scores(model, batch: Rollout) -> list[float]:
    """Step 3's reward-model score (training/step3_rlhf_finetuning/rewards.RewardModelSource):
    the value at each row's last real token, positions counted over real tokens only."""
    mask = batch.attention_mask
    values = model(batch.seq, mask, position_ids=position_ids_from_mask(mask))
    return end_scores(values, mask).float().tolist()


def decode(tokenizer, batch: Rollout) -> tuple[list[str], list[str]]:
    """(prompt texts, answer texts) as Step 3 decodes a rollout (experience.decode_rollout)."""
    prompts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True)
               for row, m in zip(batch.prompts, batch.attention_mask[:, :batch.prompts.size(1)])]
    answers = [tokenizer.decode(row[m], skip_special_tokens=True)
               for row, m in zip(batch.seq[:, batch.prompts.size(1):], batch.action_mask)]
    return prompts, answers


@torch.no_grad()
def sample_batch(model, tokenizer, prompt_ids: list[list[int]], sampling: Sampling, seed: int) -> Rollout:
    """N sampled answers to each prompt (rows repeated, a prompt's N consecutive), seeded."""
    from inference.generation import generation_config, seeded_rng
    from utils.data.collators import pad_sequences

    rows = [torch.tensor(ids) for ids in prompt_ids for _ in range(sampling.n)]
    prompts, mask = pad_sequences(rows, tokenizer.pad_token_id, left=True)
    prompts, mask = prompts.to(model.device), mask.to(model.device)
    config = generation_config(max_new_tokens=sampling.max_new_tokens, do_sample=True,
                               temperature=sampling.temperature, top_k=0, top_p=sampling.top_p,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with seeded_rng(seed, model.device):
        seq = model.generate(input_ids=prompts, attention_mask=mask, generation_config=config)
    answers = seq[:, prompts.size(1):]
    # Step 3's rule (rollout.py): the answer runs to its first eos, included
    action_mask = (torch.ones_like(answers, dtype=torch.bool) if tokenizer.eos_token_id is None
                   else answer_mask(answers, tokenizer.eos_token_id, tokenizer.pad_token_id))
    return Rollout(prompts, seq, torch.cat([mask, action_mask.long()], 1), action_mask)


def best_of_n(model, tokenizer, session, questions: list[str], columns: list[dict], sampling: Sampling,
              reward: Reward) -> list[Choice]:
    """One Choice per question: N answers sampled from `model` (prompts built by the chat
    `session`), ranked by `reward`. The same seed gives every model the same random stream."""
    from inference.generation import draw_seed

    generator = torch.Generator().manual_seed(sampling.seed)
    per_batch = max(1, sampling.batch_size // sampling.n)
    choices = []
    for start in range(0, len(questions), per_batch):
        batch_q = questions[start:start + per_batch]
        batch = sample_batch(model, tokenizer, [session.prompt_ids(q) for q in batch_q], sampling,
                             draw_seed(generator))
        rows_q = [q for q in batch_q for _ in range(sampling.n)]
        rows_c = [columns[start + i] for i in range(len(batch_q)) for _ in range(sampling.n)]
        origins = [f"prompt {start + i + 1} answer {j + 1}" for i in range(len(batch_q)) for j in range(sampling.n)]
        rewards, parts = reward.score(tokenizer, batch, rows_q, rows_c, origins)
        _, answers = decode(tokenizer, batch)
        choices += group(answers, rewards, parts, sampling.n, session.cut_answer)
    return choices


def group(answers: list[str], rewards: list[float], parts: dict, n: int, cut) -> list[Choice]:
    """Rows -> one Choice per prompt (its n consecutive rows), answers cut as the report shows them."""
    out = []
    for i in range(0, len(answers), n):
        r = rewards[i:i + n]
        out.append(Choice([cut(a) for a in answers[i:i + n]], r, {k: v[i:i + n] for k, v in parts.items()},
                          pick_best(r)))
    return out


def grade(choices: list[Choice], questions: list[str], family) -> None:
    """Fill each Choice's ground-truth scores from the task family's checker."""
    for question, choice in zip(questions, choices):
        choice.scores = family.score_batch([question] * len(choice.answers), choice.answers)
