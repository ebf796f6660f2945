"""Step 3: RLHF with PPO — actor, reference, critic, reward model (+ EMA, + ptx).

Run from the repository root:
    python -m training.step3_rlhf_finetuning.main --actor_model_name_or_path output/step1_sft \\
        --critic_model_name_or_path output/step2_reward
    deepspeed --num_gpus 2 --module training.step3_rlhf_finetuning.main --actor_zero_stage 3 ...

Outputs <output_dir>/actor (and actor_ema with --enable_ema), <output_dir>/critic (with --advantage gae):
Hugging Face folders; chat.py loads the actors.
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run Step 3 from the repository root as "
                     "`python -m training.step3_rlhf_finetuning.main`")

from training.step3_rlhf_finetuning.config import Step3Config
from utils.cli import run_entry
from utils.config import parse_config

__all__ = ["Step3Config", "main"]


def main(argv=None) -> None:
    cfg = parse_config(Step3Config, argv, description=__doc__.splitlines()[0])
    # imported here, as before: train.py imports this module to check flags, without torch/DeepSpeed
    from training.step3_rlhf_finetuning.loop import run
    run(cfg)


if __name__ == "__main__":
    run_entry(main)
