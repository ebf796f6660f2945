"""A round's numbers: experience statistics, the phases' matmul FLOPs (utils.flops) and
throughput, peak memory, and the mean over processes."""
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


def reward_part_means(parts_of_rollouts: list[dict[str, list]]) -> dict:
    """`reward_<name>`: each reward's mean score over the round's answers it applies to (None
    left out) on all processes. Sums and counts are reduced, not per-process means, so a process
    where a reward applies to nothing weighs nothing; a reward that applied nowhere is left out."""
    sums: dict[str, list[float]] = {}
    for parts in parts_of_rollouts:
        for name, scores in parts.items():
            applied = [x for x in scores if x is not None]
            total = sums.setdefault(name, [0.0, 0.0])
            total[0], total[1] = total[0] + sum(applied), total[1] + len(applied)
    keys = sorted(sums)  # the same rewards on every process: one config
    if keys and dist.world_size() > 1:
        t = dist.sum_over_ranks(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                             device=dist.current_device()))
        sums = dict(zip(keys, t.tolist()))
    return {f"reward_{k}": s / n for k, (s, n) in sums.items() if n}


PHASES = ("generation", "scoring", "training")


def _shape(engine, value_head: bool) -> flops.Shape | None:
    """The matmul shape of a DeepSpeed engine's model (None for a model not run)."""
    if engine is None:
        return None
    s = flops.shape(engine.module.config, engine.module)
    return s.value_head() if value_head else s


class PhaseFlops:
    """Matmul FLOPs of one round's phases, per process (utils.flops): generation with the KV
    cache; the scoring forwards (the reference, and the actor when it recomputes its rollout
    log-probs: logits for the answer positions + 1, as scoring.answer_log_probs asks; critic and
    reward model: the value head at every position);
    ppo_epochs passes of actor and critic training over the round's rows at the width
    Experience.concat pads them to. The ptx term's forwards are not counted.

    Forwards run over the padded width, so that is what is counted; `real_tokens` (prompt and
    answer tokens under the attention mask) is kept beside `padded_tokens` for a change that
    unpads them."""

    def __init__(self, engine, ppo_epochs: int, actor_checkpointing: bool, critic_checkpointing: bool,
                 actor_scoring: bool = True):
        """actor_scoring: the actor reads the rollout again to score it (--recompute_rollout_logprobs);
        otherwise only the reference's scoring forward runs on the actor's shape."""
        self.scoring_passes = 1 + int(actor_scoring)  # reference, and the actor when it recomputes
        self.actor = _shape(engine.actor, value_head=False)
        self.critic = _shape(engine.critic, value_head=True)
        self.reward = _shape(engine.reward, value_head=True)
        self.ppo_epochs, self.actor_ckpt, self.critic_ckpt = ppo_epochs, actor_checkpointing, critic_checkpointing

    def of(self, exps: list[Experience]) -> dict:
        gen = score = 0.0
        for exp in exps:
            b, p, width = len(exp), exp.prompt_len, exp.seq.size(1)
            gen += flops.generation_flops(self.actor, b, p, int(exp.action_mask.sum(1).max()))
            score += self.scoring_passes * flops.forward_flops(self.actor, b, width, logits=width - p + 1)
            score += sum(flops.forward_flops(s, b, width) for s in (self.critic, self.reward) if s is not None)
        return {"generation": gen, "scoring": score, "training": self.ppo_epochs * self.training(exps),
                "padded_tokens": sum(e.attention_mask.numel() for e in exps),
                "real_tokens": sum(int(e.attention_mask.sum()) for e in exps)}

    def training(self, exps: list[Experience]) -> float:
        """One pass of actor and critic training over the round's rows."""
        rows = sum(len(e) for e in exps)
        answers = max(e.seq.size(1) - e.prompt_len for e in exps)
        width = max(e.prompt_len for e in exps) + answers
        work = flops.training_flops(self.actor, rows, width, logits=answers + 1, checkpointing=self.actor_ckpt)
        if self.critic is not None:
            work += flops.training_flops(self.critic, rows, width, checkpointing=self.critic_ckpt)
        return work


def timing(exps: list[Experience], work: dict, gen_s: float, scoring_s: float, train_s: float,
           total_s: float) -> dict:
    """Seconds, throughput and achieved TFLOP/s of a round's phases; FLOPs per answer."""
    generated = sum(int(e.action_mask.sum()) for e in exps)
    answers = sum(len(e) for e in exps)
    total = sum(work[phase] for phase in PHASES)
    return {"generation_s": gen_s, "scoring_s": scoring_s, "training_s": train_s, "round_s": total_s,
            "samples_per_s": answers / total_s, "answers": answers, "generated_tokens": generated,
            "generation_tokens_per_s": generated / max(gen_s, 1e-9),
            "generation_tflops": work["generation"] / max(gen_s, 1e-9) / 1e12,
            "training_tflops": work["training"] / max(train_s, 1e-9) / 1e12,
            "tflops": total / total_s / 1e12, "flops_per_sample": total / answers,
            "real_token_share": work["real_tokens"] / max(work["padded_tokens"], 1),
            "peak_memory_gb": peak_memory_gb()}


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
