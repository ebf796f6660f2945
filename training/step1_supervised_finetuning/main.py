"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answers.

Run from the repository root:
    python -m training.step1_supervised_finetuning.main --model_name_or_path tiny-llama
    deepspeed --num_gpus 2 --module training.step1_supervised_finetuning.main --zero_stage 3
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run Step 1 from the repository root as "
                     "`python -m training.step1_supervised_finetuning.main`")

from dataclasses import dataclass, field

from utils.cli import run_entry
from utils.config import (CheckpointConfig, DataConfig, LogConfig, LoRAConfig, ModelConfig, OptimConfig,
                          RuntimeConfig, ZeroConfig, doc, parse_config, validate_training)


@dataclass
class SFTConfig(CheckpointConfig, LogConfig, ZeroConfig, RuntimeConfig, OptimConfig, LoRAConfig, ModelConfig, DataConfig):
    upstream_step = "step1"  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    response_loss_only: bool = field(default=False, metadata=doc(
        "Take the loss on answer tokens only (prompt tokens are masked out)."))
    def validate(self) -> None:
        validate_training(self, default_output_dir="output/step1_sft")


def main(argv=None) -> None:
    cfg = parse_config(SFTConfig, argv, description=__doc__.splitlines()[0])
    from training.step1_supervised_finetuning.step import SFT  # torch loads here: after parsing (see training/skeleton.py)
    SFT(cfg).run()


if __name__ == "__main__":
    run_entry(main)
