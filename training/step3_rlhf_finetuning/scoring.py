"""Scoring a rollout (no gradients): actor, reference and critic read each prompt + answer
once, the reward source scores the answers, and the PPO credit follows: KL-shaped per-token
rewards, then advantages and returns (GAE with the critic, or the critic-free group baselines).
The forwards are shared with the update (update.py)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from training.step3_rlhf_finetuning.config import PPOConfig
from training.step3_rlhf_finetuning.experience import Experience
from training.step3_rlhf_finetuning.rewards import RewardSource, scored_parts
from training.step3_rlhf_finetuning.rollout import Answers
from utils.model.forward import lm_logits, position_ids_from_mask
from utils.model.packed_forward import pack_for, packed_logits, packed_values, packs
from utils.model.packing import Packed
from utils.rl_math import (gae_advantages, group_advantages, kl_penalized_rewards,
                           log_probs_from_logits, masked_mean, masked_sum, token_log_probs,
                           truncated_is_weights, whiten)


def answer_log_probs(model, seq, attention_mask, prompt_len: int, temperature: float,
                     with_entropy: bool = False, pack: bool = False):
    """(B, A) log-probs of the answer tokens (and their entropy) under `model`, at the
    temperature the answers were sampled with. `pack`: over the rows' real tokens alone, where
    the model packs (utils/model/packed_forward.py); 0 at answer positions without a token."""
    packed = _packed_if(pack, model, seq, attention_mask, prompt_len, _log_probs)
    logits, labels, to_rows = _answer_logits(model, seq, attention_mask, prompt_len, packed)
    # at the temperature: the distribution the answers were sampled from
    log_probs, entropy = token_log_probs(logits, labels, temperature)
    return (to_rows(log_probs), to_rows(entropy)) if with_entropy else to_rows(log_probs)


def _answer_logits(model, seq, attention_mask, prompt_len: int, packed: Packed | None):
    """(logits, the answer tokens they predict, what brings a result back to (B, A)): (B, A, V)
    over the padded rows, or (K, V) for the K answer tokens of the packed ones."""
    answers = seq[:, prompt_len:]
    if packed is None:
        logits = lm_logits(model, seq, attention_mask, columns=slice(prompt_len - 1, -1))
        return logits, answers, lambda t: t
    return packed_logits(model, packed), answers.flatten()[packed.target], packed.unpack


def _log_probs(model, seq, attention_mask, prompt_len: int, packed: Packed | None) -> torch.Tensor:
    """(B, A) log-probs at temperature 1, padded or packed: what packs() compares."""
    logits, labels, to_rows = _answer_logits(model, seq, attention_mask, prompt_len, packed)
    return to_rows(log_probs_from_logits(logits, labels))


def critic_values(model, seq, attention_mask, prompt_len: int, pack: bool = False) -> torch.Tensor:
    """(B, A) critic values of the states before each answer token; `pack` as answer_log_probs."""
    packed = _packed_if(pack, model, seq, attention_mask, prompt_len, _values)
    return _values(model, seq, attention_mask, prompt_len, packed)


def _values(model, seq, attention_mask, prompt_len: int, packed: Packed | None) -> torch.Tensor:
    if packed is not None:
        return packed.unpack(packed_values(model, packed).float())
    values = model(seq, attention_mask, position_ids=position_ids_from_mask(attention_mask))
    return values[:, prompt_len - 1:-1].float()


def _packed_if(pack: bool, model, seq, attention_mask, prompt_len: int, outputs) -> Packed | None:
    """The rows packed when asked and `model` packs (decided on its first call), else None."""
    if pack and packs(model, seq, attention_mask, prompt_len, outputs):
        return pack_for(model, seq, attention_mask, prompt_len)
    return None


def recomputes_rollout_logprobs(ppo: PPOConfig, actor) -> bool:
    """--recompute_rollout_logprobs as given, else its default for this actor: recompute in bf16
    (the generation pass drifts there), or for --rollout_is_cap; keep the generation's in fp32."""
    if ppo.recompute_rollout_logprobs is not None:
        return ppo.recompute_rollout_logprobs
    return ppo.rollout_is_cap > 0 or next(actor.parameters()).dtype != torch.float32


@dataclass
class Scored:
    """A rollout's numbers before credit: (B, A) log-probs of actor and reference, critic values
    (0 without a critic, None when left to the update), (B,) scores; parts: each reward's own
    scores when several are weighed (rewards.scored_parts); is_weights: (B, A) truncated
    importance weights or None; stats: the rollout's diagnostics (generation vs recomputed
    log-probs) when there are any."""
    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    parts: dict
    is_weights: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def score_rollout(answers: Answers, actor, ref, critic, reward: RewardSource, temperature: float,
                  ppo: PPOConfig | None = None, values_later: bool = False) -> Scored:
    """Score the answers. The actor's log-probs are the generation pass's own (answers.log_probs)
    unless the sampler kept none (recomputes_rollout_logprobs decided so, once, for the trainer)
    or --rollout_is_cap weighs them against a recomputing forward. `values_later`: no critic
    forward here, values None (the update's forward gives them: Step3Config.values_from_update)."""
    ppo = ppo or PPOConfig()
    seq, mask, p = answers.seq, answers.attention_mask, answers.prompt_len
    # the reward first: a failing reward function stops the run before the forwards are spent
    scores, parts = scored_parts(reward, answers.prompts, seq, mask, answers.action_mask, answers.rows)
    recompute = answers.log_probs is None or ppo.rollout_is_cap > 0
    critic = None if values_later else critic
    models = [*([actor] if recompute else []), *([critic] if critic is not None else [])]
    for model in models:
        model.eval()
    pack = ppo.pack_sequences
    log_probs = answer_log_probs(actor, seq, mask, p, temperature, pack=pack) if recompute else answers.log_probs
    ref_log_probs = answer_log_probs(ref, seq, mask, p, temperature, pack=pack)
    # masked to the answer tokens once, by with_values
    values = (critic_values(critic, seq, mask, p, pack) if critic is not None
              else None if values_later else torch.zeros_like(log_probs))
    for model in models:
        model.train()
    scored = Scored(log_probs, ref_log_probs, values, scores, parts)
    if recompute and answers.log_probs is not None:  # both: how far generation and training disagree
        mask = answers.action_mask
        scored.stats["rollout_logprob_gap"] = masked_mean((log_probs - answers.log_probs).abs(), mask).item()
        if ppo.rollout_is_cap:
            scored.is_weights = truncated_is_weights(log_probs, answers.log_probs, mask, ppo.rollout_is_cap)
            scored.stats["rollout_is_weight"] = masked_mean(scored.is_weights, mask).item()
    return scored


@torch.no_grad()
def credit(answers: Answers, scored: Scored, ppo: PPOConfig, kl_coef: float, samples_per_prompt: int) -> Experience:
    """The scored rollout as PPO's Experience: rewards, advantages and returns."""
    action_mask = answers.action_mask
    log_probs, ref_log_probs, values, scores = scored.log_probs, scored.ref_log_probs, scored.values, scored.scores
    kl_coef = 0.0 if ppo.kl_in_loss else kl_coef  # with the KL as a loss term the reward is the score alone
    rewards = kl_penalized_rewards(log_probs, ref_log_probs, scores, action_mask, kl_coef, ppo.clip_reward_value)
    exp = Experience(prompts=answers.prompts, seq=answers.seq, attention_mask=answers.attention_mask,
                     action_mask=action_mask, log_probs=log_probs, ref_log_probs=ref_log_probs, values=values,
                     scores=scores, rewards=rewards, advantages=None, returns=None)
    if ppo.uses_critic:
        return exp if values is None else with_values(exp, values, ppo, scored.is_weights)
    # each answer against the other answers to its prompt
    kl_returns = None if ppo.kl_in_loss else -kl_coef * masked_sum(log_probs - ref_log_probs, action_mask, 1)
    per_answer = group_advantages(scores.clamp(-ppo.clip_reward_value, ppo.clip_reward_value),
                                  samples_per_prompt, ppo.advantage, ppo.scale_rewards, kl_returns)
    advantages = per_answer.unsqueeze(1) * action_mask.float()
    return replace(exp, advantages=_finished(advantages, action_mask, ppo, scored.is_weights),
                   returns=torch.zeros_like(advantages))


@torch.no_grad()
def with_values(exp: Experience, values: torch.Tensor, ppo: PPOConfig, is_weights=None) -> Experience:
    """`exp` with the critic's (B, A) values, zeroed off the answer tokens, and their GAE
    advantages and returns."""
    values = values * exp.action_mask
    advantages, returns = gae_advantages(values, exp.rewards, exp.action_mask, ppo.gamma, ppo.lam)
    return replace(exp, values=values, advantages=_finished(advantages, exp.action_mask, ppo, is_weights),
                   returns=returns)


def _finished(advantages: torch.Tensor, action_mask: torch.Tensor, ppo: PPOConfig, is_weights) -> torch.Tensor:
    """Whitened as asked; TIS weighs the policy-gradient term (w >= 0 commutes with the clip)."""
    if ppo.whiten_advantages:
        advantages = whiten(advantages, action_mask)
    return advantages if is_weights is None else advantages * is_weights
