"""Loss math for learning from preferences and rewards, as small pure tensor functions.

Conventions: a batch of token sequences is (B, L); `logits[:, t]` predicts token `t + 1`, so
per-token log-probs and masks of generated/answer tokens are (B, L - 1), aligned with
`input_ids[:, 1:]`. Masks are 0/1 (bool or numeric); reductions ignore masked-out entries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) token ids -> (B, T) log p(token), computed in fp32.

    gather - logsumexp instead of log_softmax: no second (B, T, V) tensor is kept for backward."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the entries where mask is 1 (0 where the mask is empty, not NaN)."""
    mask = mask.to(values.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def answer_token_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) right-padded mask + (B,) prompt lengths -> (B, L - 1) mask of the answer tokens
    among the predicted ones (position t predicts token t + 1)."""
    positions = torch.arange(1, attention_mask.size(1), device=attention_mask.device)
    after_prompt = positions.unsqueeze(0) >= prompt_lengths.to(attention_mask.device).unsqueeze(1)
    return after_prompt & attention_mask[:, 1:].bool()


def sequence_log_probs(logits: torch.Tensor, input_ids: torch.Tensor,
                       token_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of `input_ids` -> (B,) summed log-prob of the tokens in `token_mask`
    ((B, L - 1), e.g. from answer_token_mask)."""
    per_token = log_probs_from_logits(logits[:, :-1], input_ids[:, 1:])
    return masked_sum(per_token, token_mask, dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023) on (B,) summed answer log-probs.

    The implicit reward of an answer is beta * (log pi(y|x) - log pi_ref(y|x)); the loss is
    -log sigmoid(r_chosen - r_rejected). With label_smoothing e > 0 the labels are assumed to be
    flipped with probability e (conservative DPO): (1 - e) * that + e * -log sigmoid(r_rejected -
    r_chosen). Returns (mean loss, chosen rewards, rejected rewards), the rewards detached."""
    chosen_rewards = beta * (policy_chosen.float() - ref_chosen.float())
    rejected_rewards = beta * (policy_rejected.float() - ref_rejected.float())
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


# ---- PPO (InstructGPT / DeepSpeed-Chat step 3). All (B, A) tensors cover the answer tokens:
# column t is the t-th generated token; action_mask marks the real ones (up to the first eos).

def answer_mask(answers: torch.Tensor, eos_token_id: int | list[int] | None,
                pad_token_id: int) -> torch.Tensor:
    """(B, A) generated ids -> (B, A) bool mask of the answer tokens, the first eos included.

    Decided by the first eos, not by `!= pad`: many tokenizers use eos as pad. Without an eos id
    the pad tokens end the answer. An answer that never stops is cut at A (all True)."""
    if eos_token_id is None:
        return answers != pad_token_id
    eos = torch.as_tensor(eos_token_id, device=answers.device).view(-1)
    is_eos = torch.isin(answers, eos)
    positions = torch.arange(answers.size(1), device=answers.device)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), answers.size(1) - 1)
    return positions.unsqueeze(0) <= first.unsqueeze(1)


def answer_width(action_mask: torch.Tensor) -> int:
    """Columns up to the last answer token of any row (at least 1): the rest is padding."""
    used = action_mask.any(0).nonzero()
    return int(used.max()) + 1 if used.numel() else 1


def kl_penalized_rewards(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, scores: torch.Tensor,
                         action_mask: torch.Tensor, kl_coef: float, clip_reward: float) -> torch.Tensor:
    """Per-token rewards (B, A): -kl_coef * (log pi - log pi_ref) on every answer token, plus the
    reward model's score (B,), clipped to +-clip_reward, on the last answer token."""
    mask = action_mask.to(log_probs.dtype)
    rewards = -kl_coef * (log_probs - ref_log_probs) * mask
    last = (action_mask.long() * torch.arange(1, mask.size(1) + 1, device=mask.device)).argmax(1)
    bonus = scores.to(rewards.dtype).clamp(-clip_reward, clip_reward) * mask.amax(1)
    return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))


def adaptive_kl_coef(coef: float, kl: float, target: float, n_answers: int, horizon: int) -> float:
    """Ziegler et al. (2019)'s proportional KL controller: the coefficient after a rollout of
    `n_answers` whose mean KL per answer was `kl`. The relative error is clipped to +-0.2 so one
    noisy rollout cannot swing it."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_answers / horizon)


def gae_advantages(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each answer, (B, A) -> (advantages, returns).

    The value after an answer's last token is 0 (the episode ends there); positions after it are
    masked to 0, so they contribute nothing and rows of different lengths share one loop."""
    mask = action_mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def group_relative_advantages(scores: torch.Tensor, group_size: int, action_mask: torch.Tensor,
                              kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages for `group_size` answers per prompt (rows grouped consecutively):
    grpo = (score - group mean) / group std; rloo = score - mean of the other answers. Every
    token of an answer gets its answer's advantage."""
    groups = scores.float().view(-1, group_size)
    if kind == "grpo":
        adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    elif kind == "rloo":
        adv = groups - (groups.sum(1, keepdim=True) - groups) / max(group_size - 1, 1)
    else:
        raise ValueError(f"unknown group advantage {kind!r}")
    return adv.view(-1, 1) * action_mask.float()


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalize to zero mean, unit variance over the masked entries (masked ones stay 0)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate: mean over answer tokens of
    max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)), ratio = pi / pi_old."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), action_mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               action_mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean over answer tokens of max((v - R)^2, (v_clip - R)^2), where
    v_clip stays within +-clip of the value at generation time."""
    values = values.float()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    worst = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, action_mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax, in fp32."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
