"""Reward model (Step 2) and critic (Step 3): a transformer backbone with a scalar value head.

It is the Hugging Face `<Family>ForSequenceClassification` model with one label, used token
by token: the head gives a value at every position (the critic needs them all) and the
reward of a sequence is the value at its last real token. Because it *is* that HF class,
a saved reward model loads with `AutoModelForSequenceClassification` in other tools too.

The last real token is found from the attention mask, not from pad ids: that handles right
padding, left padding, and OPT, whose leading BOS `</s>` has the pad id yet is real text
(what DeepSpeed-Chat's `--num_padding_at_beginning` works around).

DeepSpeed-Chat's reward models load here (utils/model/pickled.py renames their weights) and score
the same wherever its rule and ours pick the same token: right-padded text with no pad id inside,
as in Step 2. Its rule differs in two places: it ends a sequence at the first pad id, so a real
token that has the pad id (eos used as pad) ends it early; and in Step 3, where eos is the pad,
it reads the token before the generated eos, while ours reads the eos itself (Step 3 counts the
first eos as part of the answer).
"""
from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import ConfigError
from utils.model.loading import load_hf_model
from utils.model.lora import base_model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B,) index of the last 1 in each row (0 for an all-zero row)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def end_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) per-token values -> (B,) value at each row's last real token."""
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of InstructGPT: mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def divergence_loss(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor, chosen_values: torch.Tensor,
                    rejected_values: torch.Tensor, chosen_mask: torch.Tensor,
                    rejected_mask: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-Chat's variant: -log sigmoid(v_chosen - v_rejected) averaged over the tokens
    from where the two sequences first differ to the end of the longer one, then over pairs.

    All (B, L), both right-padded to the same L. Identical pairs are scored at their last token."""
    positions = torch.arange(chosen_ids.size(1), device=chosen_ids.device)
    differs = (chosen_ids != rejected_ids) | (chosen_mask != rejected_mask)
    last_c, last_r = last_token_index(chosen_mask), last_token_index(rejected_mask)
    start = torch.where(differs.any(1), differs.float().argmax(1), last_c)
    end = torch.maximum(last_c, last_r) + 1
    span = ((positions >= start[:, None]) & (positions < end[:, None])).float()
    per_token = -F.logsigmoid(chosen_values.float() - rejected_values.float())
    return ((per_token * span).sum(1) / span.sum(1).clamp(min=1)).mean()


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Accuracy (chosen scored strictly higher) and mean scores and margin of a batch."""
    chosen, rejected = chosen.float(), rejected.float()
    return {"accuracy": (chosen > rejected).float().mean().item(),
            "chosen_score": chosen.mean().item(), "rejected_score": rejected.mean().item(),
            "margin": (chosen - rejected).mean().item()}


class RewardModel(nn.Module):
    """Wraps an HF `*ForSequenceClassification` (num_labels=1) to give per-token values."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not isinstance(getattr(hf_model, "score", None), nn.Linear):
            raise ConfigError(f"{type(hf_model).__name__} has no linear `score` head to use as value head")
        self.hf_model = hf_model
        self.config = hf_model.config

    @property
    def backbone(self) -> nn.Module:
        return base_model(self.hf_model).base_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L) values. Pass position_ids for left-padded rows (see
        utils/model/forward.py); families without them (BLOOM) follow the mask anyway. No mask
        with packed rows: their position ids say where each sequence starts (utils/model/packing.py)."""
        extra = {}
        if position_ids is not None and "position_ids" in inspect.signature(self.backbone.forward).parameters:
            extra["position_ids"] = position_ids
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False, **extra).last_hidden_state
        return self.hf_model.score(hidden).squeeze(-1)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) reward: the value at each sequence's last real token."""
        return end_scores(self(input_ids, attention_mask), attention_mask)


def load_reward_model(name_or_path: str, tokenizer, dtype: torch.dtype = torch.float32,
                      dropout: float | None = None, trust_remote_code: bool = False,
                      gradient_checkpointing: bool = False) -> RewardModel:
    """From a causal LM (a Step 1 output: the LM head is dropped and the value head starts
    from the family's default init) or from a saved reward model: ours, or DeepSpeed-Chat's
    (`rwtransformer.*` + `v_head.weight` in pytorch_model.bin, renamed onto this class's
    backbone and `score` head by utils/model/pickled.py; the same weights, the same scores)."""
    from transformers import AutoModelForSequenceClassification

    try:
        hf_model = load_hf_model(AutoModelForSequenceClassification, name_or_path, tokenizer, dtype,
                                 dropout, trust_remote_code, gradient_checkpointing, num_labels=1)
    except ConfigError as err:
        cause = err.__cause__  # the family has no sequence-classification class (e.g. codegen)
        if isinstance(cause, ValueError) and "AutoModelForSequenceClassification" in str(cause):
            found = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>", str(cause))
            raise ConfigError(f"{name_or_path} cannot be used as a reward model: transformers has no "
                              f"sequence-classification class for {found[1] if found else 'its model type'}") from err
        raise
    return RewardModel(hf_model)
