"""A round's numbers: experience statistics, the phases' FLOPs (DeepSpeed-Chat paper counting)
and throughput, peak memory, and the mean over processes."""
from __future__ import annotations

import resource

import torch

from training.step3_rlhf_finetuning.experience import Experience
from utils import dist
from utils import flops
from utils.rl_math import masked_sum


def experience_stats(exp: Experience) -> dict:
    """Means over the batch: reward model score, KL to the reference (summed over each
    answer), total shaped reward, answer length."""
    mask = exp.action_mask
    return {"reward": exp.scores.mean().item(),
            "kl": masked_sum(exp.log_probs - exp.ref_log_probs, mask, dim=1).mean().item(),
            "shaped_return": masked_sum(exp.rewards, mask, dim=1).mean().item(),
            "answer_len": mask.float().sum(1).mean().item()}


def rollout_stats(exps: list[Experience]) -> dict:
    """experience_stats averaged over a round's rollouts."""
    per_exp = [experience_stats(e) for e in exps]
    return {k: mean([st[k] for st in per_exp]) for k in per_exp[0]}


class PhaseFlops:
    """FLOPs of one round's phases, per process."""

    def __init__(self, engine, ppo_epochs: int, actor_checkpointing: bool, critic_checkpointing: bool):
        self.actor_cfg = engine.actor.module.config
        scorer = engine.critic or engine.reward  # both start from the reward model
        self.critic_cfg = scorer.module.config if scorer is not None else None
        self.has_critic = engine.critic is not None
        # the critic's and the reward model's forwards (each left out when not run)
        self.critic_models = int(self.has_critic) + int(engine.reward is not None)
        self.actor_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                for p in engine.ref.module.parameters())
        self.ppo_epochs, self.actor_ckpt, self.critic_ckpt = ppo_epochs, actor_checkpointing, critic_checkpointing

    def of(self, exps: list[Experience]) -> dict:
        gen = score = train = 0.0
        for exp in exps:
            b, p, seq_len = len(exp), exp.prompt_len, exp.seq.size(1)
            decoded = int(exp.action_mask.sum(1).max())
            gen += flops.generation_flops(self.actor_cfg, self.actor_params, b, p, decoded)
            score += 2 * flops.forward_flops(self.actor_cfg, b, seq_len)  # actor and reference
            train += self.ppo_epochs * flops.training_flops(self.actor_cfg, b, seq_len, self.actor_ckpt)
            if self.critic_models:
                score += self.critic_models * flops.forward_flops(self.critic_cfg, b, seq_len)
            if self.has_critic:
                train += self.ppo_epochs * flops.training_flops(self.critic_cfg, b, seq_len, self.critic_ckpt)
        return {"generation": gen, "scoring": score, "training": train}


def timing(exps: list[Experience], work: dict, gen_s: float, scoring_s: float, train_s: float,
           total_s: float) -> dict:
    """Seconds, throughput and achieved TFLOP/s of a round's phases."""
    generated = sum(int(e.action_mask.sum()) for e in exps)
    return {"generation_s": gen_s, "scoring_s": scoring_s, "training_s": train_s, "round_s": total_s,
            "samples_per_s": sum(len(e) for e in exps) / total_s, "generated_tokens": generated,
            "generation_tokens_per_s": generated / max(gen_s, 1e-9),
            "generation_tflops": work["generation"] / max(gen_s, 1e-9) / 1e12,
            "training_tflops": work["training"] / max(train_s, 1e-9) / 1e12,
            "tflops": sum(work.values()) / total_s / 1e12, "peak_memory_gb": peak_memory_gb()}


def peak_memory_gb() -> float:
    """Peak accelerator memory on GPU, else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def reduce_mean(metrics: dict) -> dict:
    """Average each metric over the processes (each rolled out its own prompts)."""
    if dist.world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = dist.sum_over_ranks(torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=dist.current_device()))
    return dict(zip(keys, (t / dist.world_size()).tolist()))
