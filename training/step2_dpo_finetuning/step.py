"""DPO as the skeleton runs it (training/skeleton.py): the policy and its frozen reference, the
DPO loss, pair accuracy and implicit rewards."""
from __future__ import annotations

import torch

from training.skeleton import Step, load_trained_lm, lora_if_asked
from utils import dist
from utils.data import DataCollatorReward, to_device
from utils.losses import dpo_batch_loss, dpo_pair_loss
from utils.model import AdaptersOff, load_causal_lm, require_same_tokenizer, resolve_model_path


class DPO(Step):
    name, data_step, collator, unit = "dpo", 2, DataCollatorReward, "pairs"
    no_data, headline = "DPO has no preference pairs", "accuracy"

    def __init__(self, cfg):
        super().__init__(cfg)
        # With only the adapters trained and no reference named, the reference is the policy
        # with its adapters switched off: no second copy of the model.
        self.adapter_reference = cfg.lora_dim > 0 and cfg.only_optimize_lora and not cfg.ref_model_name_or_path
        self.reference = None  # the frozen reference engine, unless adapter_reference

    def build_model(self, model_path, tokenizer, strategy):
        model = load_trained_lm(self.cfg, model_path, tokenizer, strategy.torch_dtype)
        if not self.adapter_reference:
            self.reference = self.reference_engine(strategy, model_path, tokenizer)
        return lora_if_asked(model, self.cfg)

    def reference_engine(self, strategy, model_path, tokenizer):
        """The frozen reference as a DeepSpeed inference engine (ZeRO-3 sharded when the policy is)."""
        cfg = self.cfg
        ref_path = resolve_model_path(cfg.ref_model_name_or_path) if cfg.ref_model_name_or_path else model_path
        if ref_path != model_path:
            require_same_tokenizer(tokenizer, ref_path, "reference model", f"the policy ({cfg.model_name_or_path})",
                                   cfg.trust_remote_code)
        model = load_causal_lm(ref_path, tokenizer, dtype=strategy.torch_dtype, dropout=0.0,
                               trust_remote_code=cfg.trust_remote_code)
        return strategy.prepare_frozen(model, zero_stage=cfg.zero_stage, offload=cfg.offload_reference_model,
                                       micro_batch=2 * cfg.per_device_train_batch_size)

    def describe(self) -> str:
        reference = "frozen copy"
        if self.adapter_reference:  # a flag with nothing to act on is said, not silently dropped
            reference = "LoRA adapters off" + (" (--offload_reference_model: nothing to place, the reference is "
                                               "the policy's own weights)" if self.cfg.offload_reference_model else "")
        return f", beta {self.cfg.beta}, reference: {reference}"

    def reference_for(self, engine):
        return AdaptersOff(engine) if self.adapter_reference else self.reference

    def loss(self, engine, batch):
        return dpo_batch_loss(engine, self.reference_for(engine), batch, self.cfg.beta, self.cfg.label_smoothing)

    def evaluate(self, engine, loader, device) -> dict:
        """Accuracy, mean implicit rewards and margin, and the pair-weighted DPO loss, over all eval pairs."""
        losses, chosen_all, rejected_all = [], [], []
        for batch in loader:
            loss, chosen, rejected = dpo_pair_loss(engine, self.reference_for(engine), to_device(batch, device),
                                                   self.cfg.beta, self.cfg.label_smoothing)
            losses.append(loss.view(1) * chosen.size(0))
            chosen_all.append(chosen)
            rejected_all.append(rejected)
        chosen, rejected = dist.all_gather_cat(torch.cat(chosen_all)), dist.all_gather_cat(torch.cat(rejected_all))
        loss = dist.all_gather_cat(torch.cat(losses)).sum() / chosen.numel()
        return {"accuracy": (chosen > rejected).float().mean().item(),
                "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
                "margin": (chosen - rejected).mean().item(), "loss": loss.item()}
