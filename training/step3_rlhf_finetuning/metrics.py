"""A round's numbers: experience statistics, the phases' matmul FLOPs (utils.flops) and
throughput, peak memory, and the mean over processes."""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from training.step3_rlhf_finetuning.experience import Experience
from utils import dist
from utils import flops
from utils.model.packed_forward import decision, packed_shape_for
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


@dataclass
class _Rows:
    """What decides a forward's work over some rows: each row's real tokens and answer tokens,
    the padded width and answer columns."""
    real: torch.Tensor     # (rows,)
    answers: torch.Tensor  # (rows,)
    width: int
    answer_columns: int

    @staticmethod
    def of(exps: list[Experience]) -> "_Rows":
        """The rows as Experience.concat lays them out: prompts and answers padded to the widest."""
        answer_columns = max(e.seq.size(1) - e.prompt_len for e in exps)
        real, answers = (torch.cat([e.attention_mask.sum(1) for e in exps]),
                         torch.cat([e.action_mask.sum(1) for e in exps]))
        return _Rows(real, answers, max(e.prompt_len for e in exps) + answer_columns, answer_columns)

    def split(self, size: int) -> list["_Rows"]:
        """Micro-batches of `size` rows, as Experience.split makes them."""
        return [_Rows(real, answers, self.width, self.answer_columns)
                for real, answers in zip(self.real.split(size), self.answers.split(size))]

    def run_by(self, model, lm_head: bool) -> tuple[int, int, dict]:
        """(rows, width, head) of `model`'s forward: packed bins with the LM head on the answer
        tokens alone, or the padded rows with it on the answer columns (logits_to_keep); a
        value head reads every position either way."""
        if decision(model):
            bins, width = packed_shape_for(model, self.real.tolist())
            return bins, width, {"head_tokens": int(self.answers.sum())} if lm_head else {}
        return len(self.real), self.width, {"logits": self.answer_columns} if lm_head else {}


class PhaseFlops:
    """Matmul FLOPs of one round's phases, per process (utils.flops): generation with the KV
    cache; the scoring forwards (the reference, and the actor when it recomputes its rollout
    log-probs: the LM head on the answer positions; critic and reward model: the value head at
    every position; not the critic for a rollout whose values its training forward gave);
    ppo_epochs passes of actor and critic training over the round's micro-batches. The ptx term's
    forwards are not counted.

    What runs is counted: a model that packs (--pack_sequences, utils/model/packed_forward.py)
    reads bins of the rows' real tokens (packed_forward.packed_shape_for), one that does not
    reads the padded rows; the reward model always reads padded rows. `real_tokens` (prompt and
    answer tokens under the attention mask) and `padded_tokens` say how much of a padded
    forward is padding."""

    def __init__(self, engine, ppo_epochs: int, actor_checkpointing: bool, critic_checkpointing: bool,
                 actor_scoring: bool = True, micro_batch: int | None = None):
        """actor_scoring: the actor reads the rollout again to score it (--recompute_rollout_logprobs);
        otherwise only the reference's scoring forward runs on the actor's shape. micro_batch:
        the rows of a PPO micro-batch (--per_device_training_batch_size; None: all of a round's)."""
        self.engine, self.micro_batch = engine, micro_batch
        self.scorers = [engine.ref, *([engine.actor] if actor_scoring else [])]
        self.actor = _shape(engine.actor, value_head=False)
        self.critic = _shape(engine.critic, value_head=True)
        self.reward = _shape(engine.reward, value_head=True)
        self.ppo_epochs, self.actor_ckpt, self.critic_ckpt = ppo_epochs, actor_checkpointing, critic_checkpointing

    def of(self, exps: list[Experience]) -> dict:
        gen = score = 0.0
        for exp in exps:
            b, width, rows = len(exp), exp.seq.size(1), _Rows.of([exp])
            gen += flops.generation_flops(self.actor, b, exp.prompt_len, int(exp.action_mask.sum(1).max()))
            score += sum(_forward(self.actor, *rows.run_by(model, lm_head=True)) for model in self.scorers)
            if self.critic is not None and exp.values is not None:  # None: the update's forward gave them
                score += _forward(self.critic, *rows.run_by(self.engine.critic, lm_head=False))
            if self.reward is not None:
                score += flops.forward_flops(self.reward, b, width)
        return {"generation": gen, "scoring": score, "training": self.ppo_epochs * self.training(exps),
                "padded_tokens": sum(e.attention_mask.numel() for e in exps),
                "real_tokens": sum(int(e.attention_mask.sum()) for e in exps)}

    def training(self, exps: list[Experience]) -> float:
        """One pass of actor and critic training over the round's micro-batches, split as
        ppo_update splits them."""
        rows = _Rows.of(exps)
        work = 0.0
        for micro in rows.split(self.micro_batch or len(rows.real)):
            batch, width, head = micro.run_by(self.engine.actor, lm_head=True)
            work += flops.training_flops(self.actor, batch, width, checkpointing=self.actor_ckpt, **head)
            if self.critic is not None:
                batch, width, head = micro.run_by(self.engine.critic, lm_head=False)
                work += flops.training_flops(self.critic, batch, width, checkpointing=self.critic_ckpt, **head)
        return work


def _forward(shape: flops.Shape, batch: int, width: int, head: dict) -> float:
    return flops.forward_flops(shape, batch, width, **head)


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
            "scoring_tflops": work["scoring"] / max(scoring_s, 1e-9) / 1e12,
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
