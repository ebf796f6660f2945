"""Step 2 as the skeleton runs it (training/skeleton.py): a reward model, the pairwise (or
divergence) loss, pair accuracy and scores."""
from __future__ import annotations

import torch

from training.skeleton import Step, lora_if_asked
from utils import dist
from utils.data import DataCollatorReward, to_device
from utils.losses import reward_loss, reward_scores
from utils.model import load_reward_model, pair_metrics, pairwise_loss


class RewardModelStep(Step):
    name, data_step, collator, unit = "step2", 2, DataCollatorReward, "pairs"
    no_data, headline = "Step 2 has no preference pairs", "accuracy"

    def build_model(self, model_path, tokenizer, strategy):
        cfg = self.cfg
        model = load_reward_model(model_path, tokenizer, dtype=strategy.torch_dtype,
                                  dropout=cfg.dropout, trust_remote_code=cfg.trust_remote_code,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
        if cfg.lora_dim > 0:
            model.hf_model = lora_if_asked(model.hf_model, cfg)
            model.hf_model.score.weight.requires_grad_(True)  # the value head always trains
        return model

    def describe(self) -> str:
        return f", {self.cfg.loss} loss"

    def loss(self, engine, batch):
        return reward_loss(engine, batch, kind=self.cfg.loss)

    def evaluate(self, engine, loader, device) -> dict:
        """Accuracy, mean scores and margin, and the pairwise loss, over all eval pairs."""
        chosen_all, rejected_all = [], []
        for batch in loader:
            chosen, rejected, _ = reward_scores(engine, to_device(batch, device))
            chosen_all.append(chosen.float())
            rejected_all.append(rejected.float())
        chosen, rejected = dist.all_gather_cat(torch.cat(chosen_all)), dist.all_gather_cat(torch.cat(rejected_all))
        return {**pair_metrics(chosen, rejected), "loss": pairwise_loss(chosen, rejected).item()}
