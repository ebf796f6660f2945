"""The PPO update: one micro-batch of actor and critic (`actor_update`, `critic_update`, the
math of `train_rlhf`), the ptx term (`ptx_update`), and a round's passes over its experience in
optimizer steps (`ppo_update`). The math itself lives in utils/rl_math.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.step3_rlhf_finetuning.config import PPOConfig, Step3Config
from training.step3_rlhf_finetuning.experience import Experience
from training.step3_rlhf_finetuning.metrics import mean
from training.step3_rlhf_finetuning.scoring import answer_log_probs, critic_values, with_values
from utils import dist
from utils.data import to_device
from utils.losses import causal_lm_loss
from utils.rl_math import aggregate_loss, clipped_surrogate, k3_kl, masked_mean, value_loss
from utils.stopping import NonFinite


@dataclass
class TrainStats:
    """What one `train_rlhf` micro-batch did. Unpacks as DeepSpeed-Chat's
    `actor_loss, critic_loss = trainer.train_rlhf(exp)`."""
    actor_loss: torch.Tensor
    critic_loss: torch.Tensor  # 0 without a critic
    entropy: float             # mean entropy of the actor over the answer tokens
    policy_shift: float        # mean |log-prob change| since the rollout (0 on the first micro-step)
    skipped: bool              # a NaN/inf loss left actor or critic unchanged

    def __iter__(self):
        return iter((self.actor_loss, self.critic_loss))


@dataclass
class PtxStats:
    loss: torch.Tensor
    applied: bool  # False: a NaN/inf loss added nothing


def dapo_normalizer(engine, step_tokens: float | None) -> float | None:
    """DeepSpeed divides each micro-batch's loss by its accumulation steps and averages the
    processes' gradients: undo both, so the step's gradient is the sum over its tokens
    divided by their number."""
    if step_tokens is None:
        return None
    return step_tokens / (engine.gradient_accumulation_steps() * dist.world_size())


def actor_update(strategy, actor, exp: Experience, ppo: PPOConfig, kl_coef: float, temperature: float,
                 max_answer_len: int, boundary: bool, step_tokens: float | None):
    """The actor's clipped PPO loss on one micro-batch, backward and (at `boundary`) step.
    Returns (loss, applied, entropy, policy shift)."""
    log_probs, entropy = answer_log_probs(actor, exp.seq, exp.attention_mask, exp.prompt_len, temperature,
                                          with_entropy=True, pack=ppo.pack_sequences)
    per_token = clipped_surrogate(log_probs, exp.log_probs, exp.advantages, exp.action_mask, ppo.cliprange,
                                  ppo.cliprange_high or None)
    if ppo.kl_in_loss:
        per_token = per_token + kl_coef * k3_kl(log_probs, exp.ref_log_probs, exp.action_mask)
    loss = aggregate_loss(per_token, exp.action_mask, ppo.loss_aggregation, max_len=max_answer_len,
                          normalizer=dapo_normalizer(actor, step_tokens))
    # a NaN/inf loss contributes nothing (a zero gradient through log_probs keeps DeepSpeed's
    # accumulation intact); the loop counts the micro-batch as skipped
    applied = strategy.backward_and_step(actor, loss, log_probs, boundary=boundary)
    shift = masked_mean((exp.log_probs - log_probs.detach()).abs(), exp.action_mask).item()
    return loss.detach(), applied, masked_mean(entropy, exp.action_mask).item(), shift


def critic_update(strategy, critic, exp: Experience, ppo: PPOConfig, boundary: bool):
    """The critic's clipped value loss on one micro-batch; (loss, applied, exp). An `exp` without
    values (Step3Config.values_from_update) takes this forward's, at the weights the rollout was
    scored at, and its advantages and returns from them: the returned exp has all three."""
    values = critic_values(critic, exp.seq, exp.attention_mask, exp.prompt_len, ppo.pack_sequences)
    if exp.values is None:
        exp = with_values(exp, values.detach(), ppo)
    loss = value_loss(values, exp.values, exp.returns, exp.action_mask, ppo.cliprange_value)
    return loss.detach(), strategy.backward_and_step(critic, loss, values, boundary=boundary), exp


def ptx_update(strategy, actor, batch: dict, unsup_coef: float, fp32_loss: bool, boundary: bool) -> PtxStats:
    """InstructGPT's ptx term: a language-model loss on plain text, weighted by unsup_coef."""
    batch = to_device(batch, dist.current_device())
    logits = actor(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    loss = causal_lm_loss(logits, batch["labels"], fp32=fp32_loss)
    return PtxStats(loss.detach(), strategy.backward_and_step(actor, unsup_coef * loss, logits, boundary=boundary))


def accumulation_groups(n_micro: int, accumulation: int) -> list[range]:
    """The micro-batches of one round, in optimizer steps of `accumulation` each; the round's
    last step takes what is left, so every round ends with a step (its experience is not
    mixed into the next round's, and the schedule counts exactly these steps)."""
    return [range(start, min(start + accumulation, n_micro)) for start in range(0, n_micro, accumulation)]


def step_token_count(micro_batches: list[Experience]) -> float:
    """Answer tokens of one optimizer step's micro-batches on all processes (DAPO's normalizer)."""
    count = torch.tensor([float(sum(int(m.action_mask.sum()) for m in micro_batches))], dtype=torch.float64,
                         device=dist.current_device())
    return max(dist.sum_over_ranks(count).item(), 1.0)


class UpdateLog:
    """The accepted micro-batches' numbers of one round, averaged in `summary`."""

    def __init__(self):
        self.actor, self.critic, self.unsup, self.entropy, self.shift = [], [], [], [], []
        self.steps = 0  # optimizer steps of each trained model (benchmarks compare the work done)

    def add(self, stats: TrainStats) -> None:
        self.actor.append(stats.actor_loss.item())
        self.critic.append(stats.critic_loss.item())
        self.entropy.append(stats.entropy)
        self.shift.append(stats.policy_shift)

    def summary(self, nonfinite: NonFinite) -> dict:
        out = {"actor_loss": mean(self.actor), "critic_loss": mean(self.critic), "entropy": mean(self.entropy),
               "policy_shift": mean(self.shift), "first_policy_shift": self.shift[0] if self.shift else float("nan"),
               "skipped_nonfinite": nonfinite.total, "optimizer_steps": self.steps}
        if self.unsup:
            out["unsup_loss"] = mean(self.unsup)
        return out


def ppo_update(trainer, cfg: Step3Config, exps: list[Experience], unsup, nonfinite: NonFinite,
               round_index: int = 0) -> dict:
    """ppo_epochs passes over the round's experience in equal micro-batches, grouped into
    optimizer steps (accumulation_groups); the EMA follows each actor step. Mean losses. A
    micro-batch whose loss is NaN/inf contributed nothing (see train_rlhf): it is counted, left
    out of the means, and too many in a row stop the run (`round_index` names where)."""
    engine = trainer.rlhf_engine
    experience = Experience.concat(exps, trainer.pad_token_id)
    micro = [m for _ in range(cfg.ppo_epochs) for m in experience.split(cfg.per_device_training_batch_size)]
    log = UpdateLog()
    for group in accumulation_groups(len(micro), cfg.gradient_accumulation_steps):
        log.steps += 1
        tokens = step_token_count([micro[i] for i in group]) if cfg.ppo.loss_aggregation == "dapo" else None
        for i in group:
            boundary = i == group[-1]
            stats = trainer.train_rlhf(micro[i], boundary=boundary, step_tokens=tokens)
            skipped = stats.skipped
            if unsup is not None:
                ptx = trainer.ptx_step(next(unsup), cfg.ptx.unsup_coef, boundary=boundary)
                skipped = skipped or not ptx.applied
                if ptx.applied:
                    log.unsup.append(ptx.loss.item())
            # the skip was decided alike on every rank, so a raise here cannot hang the others
            if not nonfinite.skip(float("nan") if skipped else 0.0, round_index):
                log.add(stats)
        if engine.actor_ema is not None:  # once per actor optimizer step, as --ema_decay says
            engine.strategy.update_ema(engine.actor, engine.actor_ema, cfg.ppo.ema_decay)
    return log.summary(nonfinite)
