"""Forward passes on left-padded prompt + answer sequences (Step 3 scoring and training).

Prompts are left-padded so generation continues right after them. A plain forward over such a
row would number the first real token by its padded column; HF `generate` instead derives
positions from the attention mask, so the log-probs of the answer would not match what was
sampled. We pass the same mask-derived `position_ids` wherever the model accepts them (BLOOM
takes none: its ALiBi bias already follows the mask).
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from utils.model.lora import base_model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 -> (B, L) positions counting real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model under DeepSpeed (`.module`) and peft (`.get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return base_model(model)


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model: nn.Module, name: str) -> bool:
    return name in _forward_params(type(unwrap(model)))


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              columns: slice | None = None) -> torch.Tensor:
    """Logits of a causal LM (engine, peft model or HF model); only at the positions `columns`
    when given. transformers' logits_to_keep, given those positions, runs the LM head on them
    alone (with a 49k vocabulary that head is a fifth of SmolLM2's forward FLOPs) and returns
    them contiguous: no copy of the logits to slice them."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if columns is not None and accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = torch.arange(input_ids.shape[1], device=input_ids.device)[columns]
        return model(**kwargs).logits
    logits = model(**kwargs).logits
    return logits if columns is None else logits[:, columns]
