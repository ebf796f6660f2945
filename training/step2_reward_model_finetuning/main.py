"""Step 2: train a reward model on preference pairs (chosen vs rejected answers).

Run from the repository root:
    python -m training.step2_reward_model_finetuning.main --model_name_or_path output/step1_sft
    deepspeed --num_gpus 2 --module training.step2_reward_model_finetuning.main --zero_stage 3

The output folder is a Hugging Face `*ForSequenceClassification` model with one label: Step 3
loads it as reward model and critic, and other tools load it with AutoModelForSequenceClassification.
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run Step 2 from the repository root as "
                     "`python -m training.step2_reward_model_finetuning.main`")

from dataclasses import dataclass, field

from utils.cli import run_entry
from utils.config import (CheckpointConfig, DataConfig, LogConfig, LoRAConfig, ModelConfig, OptimConfig,
                          RuntimeConfig, ZeroConfig, doc, parse_config, validate_training)


@dataclass
class RewardConfig(CheckpointConfig, LogConfig, ZeroConfig, RuntimeConfig, OptimConfig, LoRAConfig, ModelConfig, DataConfig):
    upstream_step = "step2"  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    loss: str = field(default="pairwise", metadata=doc(
        "pairwise: -log sigmoid(r_chosen - r_rejected) on the last-token rewards; divergence: "
        "DeepSpeed-Chat's variant, averaged over the tokens after chosen and rejected diverge.",
        choices=("pairwise", "divergence")))
    num_padding_at_beginning: int = field(default=1, metadata=doc(
        "Accepted for DeepSpeed-Chat scripts and ignored: the attention mask marks real tokens, "
        "OPT's leading </s> included."))
    def validate(self) -> None:
        validate_training(self, default_output_dir="output/step2_reward")


def main(argv=None) -> None:
    cfg = parse_config(RewardConfig, argv, description=__doc__.splitlines()[0])
    from training.step2_reward_model_finetuning.step import RewardModelStep  # torch loads here: after parsing (see training/skeleton.py)
    RewardModelStep(cfg).run()


if __name__ == "__main__":
    run_entry(main)
