"""Step 1 as the skeleton runs it (training/skeleton.py): a causal LM, the SFT loss, perplexity."""
from __future__ import annotations

import math

import torch

from training.skeleton import Step, load_trained_lm, lora_if_asked
from utils import dist
from utils.data import DataCollatorSFT, to_device
from utils.losses import causal_lm_loss, sft_loss


class SFT(Step):
    name, data_step, collator, unit = "step1", 1, DataCollatorSFT, "examples"
    no_data, headline = "Step 1 has no training examples", "perplexity"

    def build_model(self, model_path, tokenizer, strategy):
        return lora_if_asked(load_trained_lm(self.cfg, model_path, tokenizer, strategy.torch_dtype), self.cfg)

    def dataset_kwargs(self) -> dict:
        return {"sft_only_data_path": self.cfg.sft_only_data_path, "response_loss_only": self.cfg.response_loss_only}

    def loss(self, engine, batch):
        return sft_loss(engine, batch, fp32=self.cfg.compute_fp32_loss)

    def evaluate(self, engine, loader, device) -> dict:
        """Token-weighted mean loss (in fp32) and its perplexity over the eval set."""
        total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
        for batch in loader:
            batch = to_device(batch, device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            n_tokens = (batch["labels"][:, 1:] != -100).sum()
            loss = causal_lm_loss(logits, batch["labels"], fp32=True)
            total += torch.stack([loss.double() * n_tokens, n_tokens.double()])
        dist.sum_over_ranks(total)
        mean = (total[0] / total[1].clamp(min=1)).item()
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
