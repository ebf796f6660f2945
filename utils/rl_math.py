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
