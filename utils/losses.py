"""The training losses of Steps 1, 2 and DPO (and Step 3's ptx term), each a function of a model
and a collated batch, so that each can be checked on its own against a hand computation.

A step's loss returns `(loss, samples, extras)`: the scalar to backpropagate, the number of
examples (SFT) or pairs (reward model, DPO) it covers, and the metrics averaged into the
`train/` log lines. Preference batches come from DataCollatorReward: 2B rows, the B chosen
answers first, then the B rejected ones in the same order. The pure tensor math (pairwise and
divergence losses, DPO's loss on log-probs) lives in utils/model/reward_model.py and
utils/rl_math.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.model.reward_model import divergence_loss, end_scores, pairwise_loss
from utils.rl_math import answer_token_mask, dpo_loss, sequence_log_probs


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100.

    `fp32` upcasts the logits first: more exact under bf16/fp16 at the cost of one
    (batch, seq, vocab) fp32 copy."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    if fp32:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def sft_loss(model, batch: dict, fp32: bool = False) -> tuple[torch.Tensor, int, dict]:
    """Step 1: the causal LM loss of a DataCollatorSFT batch (labels -100 where not trained)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return causal_lm_loss(logits, batch["labels"], fp32=fp32), batch["input_ids"].size(0), {}


def reward_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen rewards (B,), rejected rewards (B,), per-token values (2B, L)) of a reward model
    (utils/model/reward_model.py) on a 2B-row preference batch: a reward is the value at the
    row's last real token."""
    values = model(batch["input_ids"], batch["attention_mask"])
    rewards = end_scores(values, batch["attention_mask"])
    half = rewards.size(0) // 2
    return rewards[:half], rewards[half:], values


def reward_loss(model, batch: dict, kind: str = "pairwise") -> tuple[torch.Tensor, int, dict]:
    """Step 2: `pairwise` is -log sigmoid(r_chosen - r_rejected) averaged over the pairs;
    `divergence` averages that of the per-token values over the tokens after the two answers
    diverge (DeepSpeed-Chat's). Extras: accuracy, the share of pairs whose chosen answer
    scores strictly higher."""
    chosen, rejected, values = reward_scores(model, batch)
    half = chosen.size(0)
    if kind == "divergence":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        loss = divergence_loss(ids[:half], ids[half:], values[:half], values[half:], mask[:half], mask[half:])
    else:
        loss = pairwise_loss(chosen, rejected)
    return loss, half, {"accuracy": (chosen > rejected).float().mean().item()}


def answer_log_probs(model, batch: dict) -> torch.Tensor:
    """(2B,) summed log-prob of each row's answer tokens (those after `prompt_lengths`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = answer_token_mask(batch["attention_mask"], batch["prompt_lengths"])
    return sequence_log_probs(logits, batch["input_ids"], mask)


def dpo_pair_loss(policy, reference, batch: dict, beta: float, label_smoothing: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean DPO loss, chosen rewards (B,), rejected rewards (B,)) of a preference batch:
    utils/rl_math.dpo_loss on the answers' log-probs under `policy` and (without gradients)
    `reference`, any callable that answers like the policy (e.g. utils.model.AdaptersOff)."""
    with torch.no_grad():
        ref = answer_log_probs(reference, batch)
    log_probs = answer_log_probs(policy, batch)
    half = log_probs.size(0) // 2
    return dpo_loss(log_probs[:half], log_probs[half:], ref[:half], ref[half:], beta, label_smoothing)


def dpo_batch_loss(policy, reference, batch: dict, beta: float, label_smoothing: float = 0.0
                   ) -> tuple[torch.Tensor, int, dict]:
    """DPO's training loss (dpo_pair_loss). Extras: accuracy (chosen reward strictly higher) and
    the mean implicit rewards beta * log(pi / pi_ref) of the chosen and the rejected answers."""
    loss, chosen, rejected = dpo_pair_loss(policy, reference, batch, beta, label_smoothing)
    return loss, chosen.size(0), {"accuracy": (chosen > rejected).float().mean().item(),
                                  "chosen_reward": chosen.mean().item(),
                                  "rejected_reward": rejected.mean().item()}
