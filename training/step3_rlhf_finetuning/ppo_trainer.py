"""PPO for Step 3 (DeepSpeed-Chat's trainer API) over the parts that do the work:

    rollout.py     the actor samples answers (hybrid engine or HF generate)
    rewards.py     what scores them: reward model, the bundled checker, functions, weighed
    scoring.py     log-probs, values, scores, then rewards, advantages and returns
    update.py      one PPO micro-batch of actor and critic; the ptx term

`generate_experience(batch)` is the rollout + scoring phase (no gradients); `train_rlhf(exp)` is
one PPO update of actor and critic on (a micro-batch of) that experience and returns a
TrainStats record, which unpacks as DeepSpeed-Chat's `actor_loss, critic_loss`. The ptx term
(`train_unsupervised`) is an optional part of the same trainer: with `ptx=True` the actor's
step waits for it, so both losses make one optimizer step (DeepSpeedPPOTrainerUnsupervised,
DeepSpeed-Chat's name, is the trainer with ptx on).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from training.step3_rlhf_finetuning.config import as_step3_config
from training.step3_rlhf_finetuning.experience import Experience, Rows
from training.step3_rlhf_finetuning.metrics import experience_stats
from training.step3_rlhf_finetuning.rewards import Given, reward_source
from training.step3_rlhf_finetuning.rollout import AnswerSampler
from training.step3_rlhf_finetuning.scoring import credit, recomputes_rollout_logprobs, score_rollout
from training.step3_rlhf_finetuning.update import PtxStats, TrainStats, actor_update, critic_update, ptx_update

logger = logging.getLogger(__name__)

__all__ = ["DeepSpeedPPOTrainer", "DeepSpeedPPOTrainerUnsupervised", "Experience", "Rollout", "TrainStats"]


@dataclass
class Rollout:
    experience: Experience
    generation_s: float  # of the rollout's time, the seconds spent generating
    reward_parts: dict[str, list] = field(default_factory=dict)  # reward name -> score or None per answer
    stats: dict[str, float] = field(default_factory=dict)  # scoring diagnostics (scoring.Scored.stats)


class DeepSpeedPPOTrainer:
    """PPO on a DeepSpeedRLHFEngine. `args`: a Step3Config or DeepSpeed-Chat's flat namespace.
    `reward_fn`: a RewardSource or a tensor function (rewards.RewardFn) that replaces the engine's
    reward model, or utils.rewards.RewardFunction(s) that take --reward_fn's place (weighed and
    joined by the reward model as `args` says: rewards.reward_source); None: as `args` says.
    `ptx`: a ptx loss (train_unsupervised) follows each train_rlhf."""

    def __init__(self, engine, args, reward_fn: Given = None, ptx: bool = False):
        self.rlhf_engine = engine
        self.strategy = engine.strategy
        self.actor, self.ref, self.critic, self.reward = engine.actor, engine.ref, engine.critic, engine.reward
        self.args = cfg = as_step3_config(args)
        self.ppo, self.generation = cfg.ppo, cfg.generation
        self.tokenizer = engine.tokenizer
        self.pad_token_id = self.tokenizer.pad_token_id
        self.uses_critic = cfg.ppo.uses_critic
        self.ptx = ptx
        self.kl_coef = cfg.ppo.kl_ctl  # moved between rounds by the loop with --target_kl
        if self.uses_critic and self.critic is None:
            raise ValueError("--advantage gae needs the critic, but the engine was built without one")
        self.reward_source = reward_source(reward_fn, self.reward, cfg, self.tokenizer)
        # the generation pass's log-probs serve as PPO's old ones, or as TIS's denominator
        self.recomputes_logprobs = recomputes_rollout_logprobs(cfg.ppo, self.actor)
        keep = not self.recomputes_logprobs or cfg.ppo.rollout_is_cap > 0
        self.sampler = AnswerSampler(self.actor, self.tokenizer, cfg.generation, cfg.hybrid, keep_log_probs=keep)
        self._clip_warned = False  # _warn_once_if_clipped

    @property
    def hybrid(self):
        return self.sampler.hybrid

    def rollout(self, prompts, mask: torch.Tensor | None = None, values_later: bool = False) -> Rollout:
        """Answer a prompt batch and score it. `prompts` is a DataCollatorPrompt batch
        ({"prompt", "prompt_att_mask"}, and the rows' "columns" and "origins" that reward functions
        get) or, as in DeepSpeed-Chat, the two tensors. With --samples_per_prompt K the experience
        has K rows per prompt, each prompt's rows together. `values_later`: no critic forward;
        the experience's values, advantages and returns are None until train_rlhf."""
        rows = None
        if isinstance(prompts, dict):
            rows = Rows.of_batch(prompts, prompts["prompt"].size(0))
            prompts, mask = prompts["prompt"], prompts["prompt_att_mask"]
        answers = self.sampler.sample(prompts, mask, rows)
        critic = self.critic if self.uses_critic else None
        scored = score_rollout(answers, self.actor, self.ref, critic, self.reward_source,
                               self.generation.temperature, self.ppo, values_later=values_later)
        self._warn_once_if_clipped(scored.scores)
        exp = credit(answers, scored, self.ppo, self.kl_coef, self.generation.samples_per_prompt)
        return Rollout(exp, answers.generation_s, scored.parts, scored.stats)

    def _warn_once_if_clipped(self, scores: torch.Tensor) -> None:
        """Scores beyond --clip_reward_value are clipped (as DeepSpeed-Chat clips reward-model
        scores): fine for a reward model, silently flattening for a reward function on a larger
        scale (a raw length would tie every answer), so say it once."""
        clip = self.ppo.clip_reward_value
        if not self._clip_warned and bool((scores.abs() > clip).any()):
            self._clip_warned = True
            logger.warning("reward scores up to %.4g are clipped to +-%g (--clip_reward_value): raise it "
                           "for rewards on a larger scale", scores.abs().max().item(), clip)

    def generate_experience(self, prompts, mask: torch.Tensor | None = None, step: int = 0) -> Experience:
        """DeepSpeed-Chat's name: the rollout's Experience (`step` is accepted and unused)."""
        return self.rollout(prompts, mask).experience

    def train_rlhf(self, exp: Experience, boundary: bool = True, step_tokens: float | None = None) -> TrainStats:
        """One PPO micro-batch of actor and critic on `exp`.

        `boundary`: this micro-batch ends a gradient accumulation, so the models step (the loop
        decides; DeepSpeed's own count is not used); with ptx the actor's step waits for
        train_unsupervised. `step_tokens`: with --loss_aggregation dapo, the answer tokens of the
        whole optimizer step on all processes. An `exp` without values (rollout's values_later)
        gets them from the critic's forward here, which then runs first."""
        critic_first = exp.values is None
        if critic_first:
            critic_loss, critic_applied, exp = critic_update(self.strategy, self.critic, exp, self.ppo, boundary)
        actor_loss, actor_applied, entropy, shift = actor_update(
            self.strategy, self.actor, exp, self.ppo, self.kl_coef, self.generation.temperature,
            self.generation.max_answer_seq_len, boundary=boundary and not self.ptx, step_tokens=step_tokens)
        if not self.uses_critic:
            return TrainStats(actor_loss, torch.zeros(()), entropy, shift, skipped=not actor_applied)
        if not critic_first:
            critic_loss, critic_applied, _ = critic_update(self.strategy, self.critic, exp, self.ppo, boundary)
        return TrainStats(actor_loss, critic_loss, entropy, shift, skipped=not (critic_applied and actor_applied))

    def ptx_step(self, batch: dict, unsup_coef: float, boundary: bool = True) -> PtxStats:
        """The ptx loss of one text micro-batch, its gradient joining train_rlhf's actor step."""
        return ptx_update(self.strategy, self.actor, batch, unsup_coef, self.args.ptx.compute_fp32_loss, boundary)

    def train_unsupervised(self, batch: dict, unsup_coef: float, boundary: bool = True) -> torch.Tensor:
        """DeepSpeed-Chat's name: ptx_step's loss."""
        return self.ptx_step(batch, unsup_coef, boundary).loss

    experience_stats = staticmethod(experience_stats)


class DeepSpeedPPOTrainerUnsupervised(DeepSpeedPPOTrainer):
    """DeepSpeed-Chat's name for the trainer with the ptx term on: InstructGPT's language-model
    loss on plain text, weighted by `--unsup_coef`, its gradient joining the PPO gradient of the
    same micro-batch in one actor optimizer step, so the LR schedule counts PPO's steps."""

    def __init__(self, engine, args, reward_fn: Given = None):
        super().__init__(engine, args, reward_fn=reward_fn, ptx=True)
