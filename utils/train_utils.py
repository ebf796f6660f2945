"""Pieces of the training loop that every step shares."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.config import ConfigError


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100.

    `fp32` upcasts the logits first: more exact under bf16/fp16 at the cost of one
    (batch, seq, vocab) fp32 copy."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    if fp32:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise ConfigError(f"loss became {loss.item()} at step {step}; lower --learning_rate, use "
                          "--dtype bf16/fp32, or --compute_fp32_loss")


@torch.no_grad()
def evaluate_lm(engine, dataloader, device) -> dict:
    """Token-weighted mean loss and perplexity over the whole eval set, across all ranks."""
    import torch.distributed as dist

    was_training = engine.module.training
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    for batch in dataloader:
        batch = to_device(batch, device)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n_tokens = (batch["labels"][:, 1:] != -100).sum()
        loss = causal_lm_loss(logits, batch["labels"], fp32=True)
        total += torch.stack([loss.double() * n_tokens, n_tokens.double()])
    if dist.is_initialized():
        dist.all_reduce(total)
    if was_training:
        engine.train()
    mean = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
