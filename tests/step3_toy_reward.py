"""Step 3 with a programmatic reward instead of a reward model (used by the tests).

The reward is the share of answer tokens from a "good" half of the vocabulary: the tokens whose
output embedding (the LM head row) points along one fixed random direction. A random tiny model
starts near 0.5 and can reach 1 by turning its final hidden state towards that direction, so
PPO has a learnable signal that only real policy improvement can raise. (A half picked by token
id would share no direction: the policy would have to learn ~1500 tokens one by one.)
Usage: python -m tests.step3_toy_reward <Step 3 flags>   (or under deepspeed --module)
"""
from __future__ import annotations

import sys

import torch

from training.step3_rlhf_finetuning.loop import run
from training.step3_rlhf_finetuning.main import Step3Config
from utils.config import parse_config


def good_tokens(actor_path: str) -> torch.Tensor:
    """(V,) bool: LM head rows with a positive projection on a fixed random direction."""
    from transformers import AutoModelForCausalLM

    from utils.model import resolve_model_path
    head = AutoModelForCausalLM.from_pretrained(resolve_model_path(actor_path)).get_output_embeddings().weight
    direction = torch.randn(head.size(1), generator=torch.Generator().manual_seed(0))
    return (head.detach().float() @ direction) > 0


def good_share_reward(good: torch.Tensor):
    def reward(prompts: torch.Tensor, seq: torch.Tensor, attention_mask: torch.Tensor,
               action_mask: torch.Tensor) -> torch.Tensor:
        hits = good.to(seq.device)[seq[:, prompts.size(1):]].float()
        return (hits * action_mask).sum(1) / action_mask.sum(1).clamp(min=1)
    return reward


if __name__ == "__main__":
    from utils.cli import run_entry

    def main(argv=None):
        cfg = parse_config(Step3Config, sys.argv[1:] if argv is None else argv)
        run(cfg, reward_fn=good_share_reward(good_tokens(cfg.actor_model_name_or_path)))
    run_entry(main)
