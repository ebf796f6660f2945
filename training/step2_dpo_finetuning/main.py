"""Step 2 (alternative): Direct Preference Optimization of the actor on preference pairs.

Instead of a reward model plus PPO, DPO trains the Step 1 model directly on the same (chosen,
rejected) pairs Step 2 uses, against a frozen reference copy of it. The output is an actor that
chat.py loads like a Step 1 or Step 3 model.

Run from the repository root:
    python -m training.step2_dpo_finetuning.main --model_name_or_path output/step1_sft
    deepspeed --num_gpus 2 --module training.step2_dpo_finetuning.main --zero_stage 3
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run DPO from the repository root as "
                     "`python -m training.step2_dpo_finetuning.main`")

from dataclasses import dataclass, field

from utils.cli import run_entry
from utils.config import (CheckpointConfig, ConfigError, DataConfig, LogConfig, LoRAConfig, ModelConfig, OptimConfig,
                          RuntimeConfig, ZeroConfig, doc, parse_config, validate_training)


@dataclass
class DPOConfig(CheckpointConfig, LogConfig, ZeroConfig, RuntimeConfig, OptimConfig, LoRAConfig, ModelConfig, DataConfig):
    upstream_step = "dpo"  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    beta: float = field(default=0.1, metadata=doc(
        "Strength of the pull towards the reference: implicit reward = beta * log(pi / pi_ref)."))
    label_smoothing: float = field(default=0.0, metadata=doc(
        "Assumed probability that a pair's preference label is flipped (conservative DPO), in [0, 0.5)."))
    ref_model_name_or_path: str = field(default="", metadata=doc(
        "Reference model (default: --model_name_or_path). With --only_optimize_lora and no "
        "reference given, the reference is the same model with its LoRA adapters switched off."))
    offload_reference_model: bool = field(default=False, metadata=doc(
        "Keep the reference model's parameters in CPU memory (ZeRO-3 parameter offload)."))
    # DPO compares log-probs of the policy and the reference: dropout only adds noise to that.
    dropout: float | None = field(default=0.0, metadata=doc(
        "Set every dropout probability of the model to this value (DPO default: 0, no dropout)."))
    learning_rate: float = field(default=5e-6, metadata=doc("Peak learning rate."))

    def validate(self) -> None:
        validate_training(self, default_output_dir="output/step2_dpo")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def main(argv=None) -> None:
    cfg = parse_config(DPOConfig, argv, description=__doc__.splitlines()[0])
    from training.step2_dpo_finetuning.step import DPO  # torch loads here: after parsing (see training/skeleton.py)
    DPO(cfg).run()


if __name__ == "__main__":
    run_entry(main)
