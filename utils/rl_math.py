"""Loss math for learning from preferences and rewards, as small pure tensor functions.

Conventions: a batch of token sequences is (B, L); `logits[:, t]` predicts token `t + 1`, so
per-token log-probs and masks of generated/answer tokens are (B, L - 1), aligned with
`input_ids[:, 1:]`. Masks are 0/1 (bool or numeric); reductions ignore masked-out entries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# Rows of (rows, V) logits handled at once by token_log_probs: ~16 MB of fp32 temporaries.
CHUNK_ELEMENTS = 1 << 22


class _TokenLogProbs(torch.autograd.Function):
    """log p(label) and the entropy of softmax(logits / T), a few rows at a time; the gradient
    flows through the log-probs only. Per chunk of rows the temporaries are small and reused:
    the unfused ops allocated ~8 tensors the size of the logits a step (the 50-200 MB of a
    SmolLM2 round each: fresh pages, faulting in, docs/2026-12-06-allocator.md)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature: float):
        flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
        log_probs = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        entropy, log_z = torch.empty_like(log_probs), torch.empty_like(log_probs)
        for rows in _chunks(flat):
            x = flat[rows].float() / temperature
            top = x.amax(-1, keepdim=True)
            x -= top
            exp = x.exp()
            z = exp.sum(-1)
            log_z_shifted = z.log()
            log_z[rows] = log_z_shifted + top.squeeze(-1)
            log_probs[rows] = x.gather(-1, targets[rows]).squeeze(-1) - log_z_shifted
            entropy[rows] = log_z_shifted - (exp * x).sum(-1) / z  # log Z - E_p[x], x shifted by its max
        # the flat rows, not `logits`: a sliced (non-contiguous) input is copied once, not twice
        ctx.save_for_backward(flat, targets, log_z)
        ctx.temperature, ctx.shape = temperature, logits.shape
        ctx.mark_non_differentiable(entropy)
        return log_probs.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        flat, targets, log_z = ctx.saved_tensors
        grad = grad_log_probs.reshape(-1, 1).float() / ctx.temperature
        out = torch.empty_like(flat)
        for rows in _chunks(flat):  # d log p(y) / d x = onehot(y) - softmax(x)
            p = (flat[rows].float() / ctx.temperature - log_z[rows, None]).exp_()
            out[rows] = p.mul_(-grad[rows]).scatter_add_(-1, targets[rows], grad[rows])
        return out.view(ctx.shape), None, None


def _chunks(flat: torch.Tensor):
    step = max(1, CHUNK_ELEMENTS // max(1, flat.shape[-1]))
    return (slice(start, start + step) for start in range(0, flat.shape[0], step))


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits, (...) token ids -> ((...) log p(token), (...) entropy), both in fp32,
    of softmax(logits / temperature); differentiable in the log-probs (the entropy is a
    diagnostic). Computed in chunks of rows: nothing the size of the logits is allocated but
    the gradient (and one contiguous copy of a sliced input)."""
    log_probs, entropy = _TokenLogProbs.apply(logits, labels, float(temperature))
    return log_probs, entropy.detach()


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) token ids -> (B, T) log p(token), computed in fp32."""
    return token_log_probs(logits, labels)[0]


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


def group_residuals(values: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """(N,) per-answer values, `group_size` answers per prompt in consecutive rows -> each value
    against its group: rloo = value minus the mean of the other answers' (leave-one-out), grpo =
    value minus the group mean."""
    groups = values.float().view(-1, group_size)
    if kind == "rloo":
        out = groups - (groups.sum(1, keepdim=True) - groups) / max(group_size - 1, 1)
    elif kind == "grpo":
        out = groups - groups.mean(1, keepdim=True)
    else:
        raise ValueError(f"unknown group advantage {kind!r}")
    return out.view(-1)


def group_advantages(scores: torch.Tensor, group_size: int, kind: str = "grpo", scale: str = "group",
                     kl_returns: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantage of each answer (N,), from the scores (N,) of `group_size` answers per
    prompt (rows grouped consecutively).

    The scores' part is group_residuals (rloo or grpo); grpo divides it by the std of the
    group's scores (`scale` "group", GRPO as published), of the whole batch's ("batch"), or not
    at all ("none", Dr. GRPO). A group whose scores tie carries no signal: its score part is
    exactly 0 (not the rounding noise of x - mean(x, x, ...) blown up by a ~0 std).
    `kl_returns` (N,), each answer's summed KL penalty when the KL is shaped into the reward,
    is added as its own group residual and never divided by a std: otherwise, when the scores
    tie, the KL's small differences would be normalized into unit-size advantages."""
    groups = scores.float().view(-1, group_size)
    adv = group_residuals(scores, group_size, kind).view(-1, group_size)
    if kind == "grpo" and scale != "none":
        if scale not in ("group", "batch"):
            raise ValueError(f"unknown reward scaling {scale!r}")
        std = groups.std(1, keepdim=True) if scale == "group" else groups.std()
        adv = adv / (std + eps)
    tied = groups.amax(1, keepdim=True) == groups.amin(1, keepdim=True)
    adv = adv.masked_fill(tied, 0.0).view(-1)
    if kl_returns is not None:
        adv = adv + group_residuals(kl_returns, group_size, kind)
    return adv


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalize to zero mean, unit variance over the masked entries (masked ones stay 0)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def truncated_is_weights(log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, action_mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS, Yao et al. 2025): per answer token (B, A), min(p / p_rollout,
    cap), p the trainer's probability of the token and p_rollout the generation pass's; 0 on masked
    positions. Corrects for the sampler computing slightly different probabilities than training
    (precision, KV cache, fused weights); the cap bounds the variance a rare token could add."""
    log_ratio = (log_probs - rollout_log_probs).float() * action_mask
    return torch.exp(log_ratio).clamp(max=cap) * action_mask.to(torch.float32)


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      action_mask: torch.Tensor, clip: float, clip_high: float | None = None) -> torch.Tensor:
    """PPO's clipped surrogate per answer token (B, A): max(-A * ratio, -A * clip(ratio, 1 - clip,
    1 + clip_high)), ratio = pi / pi_old; 0 on masked positions. The log-ratio is masked before
    it is exponentiated, so a huge ratio on a padding position cannot give inf * 0 = NaN.
    `clip_high` (DAPO's clip-higher) defaults to `clip`."""
    mask = action_mask.bool()
    ratio = torch.exp(torch.where(mask, log_probs - old_log_probs, 0.0))
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + high)
    return torch.where(mask, torch.maximum(unclipped, clipped), 0.0)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate (B, A) of Schulman's k3, as GRPO's KL loss term:
    exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased), masked before the exp; 0 when masked."""
    mask = action_mask.bool()
    diff = torch.where(mask, ref_log_probs - log_probs, 0.0)
    return torch.where(mask, torch.exp(diff) - diff - 1.0, 0.0)


LOSS_AGGREGATIONS = ("token", "sequence", "dr_grpo", "dapo")


def aggregate_loss(per_token: torch.Tensor, action_mask: torch.Tensor, how: str = "token",
                   max_len: int | None = None, normalizer: float | None = None) -> torch.Tensor:
    """A per-token loss (B, A) (0 where masked) -> the scalar to backpropagate.

    token     mean over the micro-batch's answer tokens (DeepSpeed-Chat; TRL's "bnpo")
    sequence  mean over each answer's tokens, then over the answers (GRPO as published)
    dr_grpo   sum over tokens / (answers x max_len): no length bias (Dr. GRPO)
    dapo      sum over tokens / `normalizer`: the caller's count of answer tokens in the whole
              optimizer step (all micro-batches and processes), scaled to DeepSpeed's averaging
              (DAPO's token-level loss)"""
    mask = action_mask.to(per_token.dtype)
    if how == "token":
        return masked_mean(per_token, mask)
    if how == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if how == "dr_grpo":
        if not max_len:
            raise ValueError("dr_grpo needs max_len (the longest answer allowed)")
        return masked_sum(per_token, mask) / (per_token.size(0) * max_len)
    if how == "dapo":
        if not normalizer:
            raise ValueError("dapo needs the optimizer step's token count")
        return masked_sum(per_token, mask) / normalizer
    raise ValueError(f"unknown loss aggregation {how!r}")


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate, mean over the answer tokens (DeepSpeed-Chat's actor loss)."""
    return aggregate_loss(clipped_surrogate(log_probs, old_log_probs, advantages, action_mask, clip), action_mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               action_mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean over answer tokens of max((v - R)^2, (v_clip - R)^2), where
    v_clip stays within +-clip of the value at generation time."""
    values = values.float()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    worst = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, action_mask)
