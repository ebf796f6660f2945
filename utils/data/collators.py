"""Batch collators: pad to the longest row of the batch (optionally up to a multiple of 8); to_device
moves a collated batch to where the model runs."""
from __future__ import annotations

import torch

from utils.config import ConfigError


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def pad_sequences(seqs: list[torch.Tensor], value: int, left: bool = False,
                  pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors into (batch, length) plus the attention mask (1 = real token)."""
    length = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(length - len(s), length) if left else slice(0, len(s))
        out[row, span] = torch.as_tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return out, mask


class _Collator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token id (set pad_token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, seqs, value=None, left=False):
        return pad_sequences(seqs, self.pad_token_id if value is None else value, left,
                             self.pad_to_multiple_of)


class DataCollatorSFT(_Collator):
    """Step 1: right-padded input_ids, attention_mask, and labels with -100 on padding."""

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = self._pad([it["input_ids"] for it in items])
        labels, _ = self._pad([it["labels"] for it in items], value=-100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class DataCollatorReward(_Collator):
    """Step 2: 2B right-padded rows, the B chosen sequences first, then the B rejected, plus
    each row's prompt length (2B,) when the items carry one (DPO scores the answer tokens only)."""

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        input_ids, mask = self._pad(seqs)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if all("prompt_length" in it for it in items):
            lengths = torch.cat([torch.as_tensor(it["prompt_length"]).view(1) for it in items])
            batch["prompt_lengths"] = lengths.repeat(2)
        return batch


class DataCollatorPrompt(_Collator):
    """Step 3: LEFT-padded prompts, so generation continues right after each prompt's last token,
    with each prompt's row "columns" (dicts) and "origin" (source: row) in batch order ({} and ""
    for items that carry none)."""

    def __call__(self, items: list[dict]) -> dict:
        prompt, mask = self._pad([it["prompt_input_ids"] for it in items], left=True)
        return {"prompt": prompt, "prompt_att_mask": mask, "columns": [it.get("columns", {}) for it in items],
                "origins": [it.get("origin", "") for it in items]}
