"""Scoring a rollout (no gradients): actor, reference and critic read each prompt + answer
once, the reward source scores the answers, and the PPO credit follows: KL-shaped per-token
rewards, then advantages and returns (GAE with the critic, or the critic-free group baselines).
The forwards are shared with the update (update.py)."""
from __future__ import annotations

import torch

from training.step3_rlhf_finetuning.config import PPOConfig
from training.step3_rlhf_finetuning.experience import Experience
from training.step3_rlhf_finetuning.rewards import RewardSource, scored_parts
from training.step3_rlhf_finetuning.rollout import Answers
from utils.model.forward import lm_logits, position_ids_from_mask
from utils.rl_math import (entropy_from_logits, gae_advantages, group_advantages, kl_penalized_rewards,
                           log_probs_from_logits, masked_sum, whiten)


def answer_log_probs(model, seq, attention_mask, prompt_len: int, temperature: float,
                     with_entropy: bool = False):
    """(B, A) log-probs of the answer tokens (and their entropy) under `model`, at the
    temperature the answers were sampled with."""
    answers = seq[:, prompt_len:]
    logits = lm_logits(model, seq, attention_mask, last=answers.size(1) + 1)[:, :-1]
    if temperature != 1.0:  # score the distribution the answers were sampled from
        logits = logits / temperature
    log_probs = log_probs_from_logits(logits, answers)
    if not with_entropy:
        return log_probs
    with torch.no_grad():
        return log_probs, entropy_from_logits(logits)


def critic_values(model, seq, attention_mask, prompt_len: int) -> torch.Tensor:
    """(B, A) critic values of the states before each answer token."""
    values = model(seq, attention_mask, position_ids=position_ids_from_mask(attention_mask))
    return values[:, prompt_len - 1:-1].float()


@torch.no_grad()
def score_rollout(answers: Answers, actor, ref, critic, reward: RewardSource, temperature: float):
    """(log_probs, ref_log_probs, values, scores, parts) of the answers; values are 0 without a
    critic; parts: each reward's own scores when several are weighed (rewards.scored_parts)."""
    seq, mask, p = answers.seq, answers.attention_mask, answers.prompt_len
    # the reward first: a failing reward function stops the run before the forwards are spent
    scores, parts = scored_parts(reward, answers.prompts, seq, mask, answers.action_mask, answers.rows)
    models = [actor, *([critic] if critic is not None else [])]
    for model in models:
        model.eval()
    log_probs = answer_log_probs(actor, seq, mask, p, temperature)
    ref_log_probs = answer_log_probs(ref, seq, mask, p, temperature)
    values = (critic_values(critic, seq, mask, p) * answers.action_mask if critic is not None
              else torch.zeros_like(log_probs))
    for model in models:
        model.train()
    return log_probs, ref_log_probs, values, scores, parts


@torch.no_grad()
def credit(answers: Answers, log_probs, ref_log_probs, values, scores, ppo: PPOConfig, kl_coef: float,
           samples_per_prompt: int) -> Experience:
    """The scored rollout as PPO's Experience: rewards, advantages and returns."""
    action_mask = answers.action_mask
    kl_coef = 0.0 if ppo.kl_in_loss else kl_coef  # with the KL as a loss term the reward is the score alone
    rewards = kl_penalized_rewards(log_probs, ref_log_probs, scores, action_mask, kl_coef, ppo.clip_reward_value)
    if ppo.uses_critic:
        advantages, returns = gae_advantages(values, rewards, action_mask, ppo.gamma, ppo.lam)
    else:  # each answer against the other answers to its prompt
        kl_returns = None if ppo.kl_in_loss else -kl_coef * masked_sum(log_probs - ref_log_probs, action_mask, 1)
        per_answer = group_advantages(scores.clamp(-ppo.clip_reward_value, ppo.clip_reward_value),
                                      samples_per_prompt, ppo.advantage, ppo.scale_rewards, kl_returns)
        advantages = per_answer.unsqueeze(1) * action_mask.float()
        returns = torch.zeros_like(advantages)
    if ppo.whiten_advantages:
        advantages = whiten(advantages, action_mask)
    return Experience(prompts=answers.prompts, seq=answers.seq, attention_mask=answers.attention_mask,
                      action_mask=action_mask, log_probs=log_probs, ref_log_probs=ref_log_probs, values=values,
                      scores=scores, rewards=rewards, advantages=advantages, returns=returns)
