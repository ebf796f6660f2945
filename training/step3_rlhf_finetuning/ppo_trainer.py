"""PPO for Step 3: roll out answers, score them, update actor and critic.

`generate_experience` is the rollout + scoring phase (no gradients): the actor answers a batch
of prompts through the hybrid engine, then actor, reference, critic and reward model each read
the prompt + answer once. `train_rlhf` is one PPO update of actor and critic on (a micro-batch
of) that experience. The math lives in utils/rl_math.py as small tested functions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from inference.generation import pad_to_width
from utils import dist
from utils.data import to_device
from utils.losses import causal_lm_loss
from utils.model.forward import lm_logits, position_ids_from_mask
from utils.model.reward_model import end_scores
from utils.rl_math import (aggregate_loss, answer_mask, answer_width, clipped_surrogate, entropy_from_logits,
                           gae_advantages, group_advantages, k3_kl, kl_penalized_rewards,
                           log_probs_from_logits, masked_mean, masked_sum, value_loss, whiten)

# reward_fn(prompts (B, P), seq (B, P + A), attention_mask (B, P + A), action_mask (B, A)) -> (B,)
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Experience:
    """One rollout batch with all PPO needs; (B, A) tensors cover the answer tokens."""
    prompts: torch.Tensor         # (B, P) left-padded prompt ids
    seq: torch.Tensor             # (B, P + A) prompt + answer, pads after the answer
    attention_mask: torch.Tensor  # (B, P + A) real tokens of prompt and answer
    action_mask: torch.Tensor     # (B, A) answer tokens up to and including the first eos
    log_probs: torch.Tensor       # (B, A) actor when generating (PPO's "old" policy)
    ref_log_probs: torch.Tensor   # (B, A) reference model
    values: torch.Tensor          # (B, A) critic when generating
    scores: torch.Tensor          # (B,) reward model score of each whole answer
    rewards: torch.Tensor         # (B, A) KL-penalized per-token rewards
    advantages: torch.Tensor      # (B, A)
    returns: torch.Tensor         # (B, A)

    def __len__(self) -> int:
        return self.seq.size(0)

    @property
    def prompt_len(self) -> int:
        return self.prompts.size(1)

    def split(self, size: int) -> list["Experience"]:
        """Micro-batches of `size` rows for the PPO updates."""
        parts = {f.name: getattr(self, f.name).split(size) for f in fields(self)}
        return [Experience(**{name: chunks[i] for name, chunks in parts.items()})
                for i in range(len(parts["seq"]))]

    @staticmethod
    def concat(exps: list["Experience"], pad_token_id: int) -> "Experience":
        """The rows of several rollouts as one: prompts left-padded and answers right-padded to
        the widest (masks 0 there), so a round's answers split into equal micro-batches
        whatever the generation batches were."""
        if len(exps) == 1:
            return exps[0]
        p = max(e.prompt_len for e in exps)
        a = max(e.seq.size(1) - e.prompt_len for e in exps)

        def widen(e: "Experience", name: str) -> torch.Tensor:
            t = getattr(e, name)
            if t.dim() == 1:  # scores
                return t
            if name == "prompts":
                return F.pad(t, (p - t.size(1), 0), value=pad_token_id)
            if name in ("seq", "attention_mask"):  # prompt part left, answer part right
                fill = pad_token_id if name == "seq" else 0
                left = F.pad(t[:, :e.prompt_len], (p - e.prompt_len, 0), value=fill)
                right = F.pad(t[:, e.prompt_len:], (0, a - (t.size(1) - e.prompt_len)), value=fill)
                return torch.cat([left, right], 1)
            return F.pad(t, (0, a - t.size(1)), value=0)  # (B, A) answer-token tensors

        return Experience(**{f.name: torch.cat([widen(e, f.name) for e in exps]) for f in fields(Experience)})


class DeepSpeedPPOTrainer:
    """PPO on a DeepSpeedRLHFEngine (DeepSpeed-Chat's API). `reward_fn` replaces the reward
    model with a programmatic score (the engine's reward model is then not used)."""

    def __init__(self, engine, args, reward_fn: RewardFn | None = None):
        self.rlhf_engine = engine
        self.strategy = engine.strategy
        self.actor, self.ref, self.critic, self.reward = engine.actor, engine.ref, engine.critic, engine.reward
        self.args = args
        self.tokenizer = engine.tokenizer
        self.pad_token_id = self.tokenizer.pad_token_id
        # with ignore_eos nothing ends an answer early: every answer is max_answer_seq_len tokens
        self.eos_token_id = None if getattr(args, "ignore_eos", False) else self.tokenizer.eos_token_id
        self.reward_fn = reward_fn
        self.uses_critic = getattr(args, "advantage", "gae") == "gae"
        self.kl_coef = args.kl_ctl  # moved between rounds by the loop with --target_kl
        self.kl_in_loss = kl_penalty_mode(args) == "loss"
        if self.uses_critic and self.critic is None:
            raise ValueError("--advantage gae needs the critic, but the engine was built without one")
        if reward_fn is None and self.reward is None:
            raise ValueError("the engine has no reward model (--reward_source checker): pass a reward_fn")
        self.hybrid = None
        if args.enable_hybrid_engine:
            from inference.hybrid_engine import HybridEngine
            self.hybrid = HybridEngine(
                self.actor, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                inference_tp_size=args.inference_tp_size,
                release_inference_cache=args.release_inference_cache,
                tp_gather_partition_size=args.tp_gather_partition_size)
        self.last_generation_s = 0.0
        self.last_update_skipped = False  # the last train_rlhf left a model unchanged (NaN/inf loss)

    # ---------------------------------------------------------------- rollout

    @torch.no_grad()
    def _generate(self, prompts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.args
        sampling = {"do_sample": True, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p}
        if self.hybrid is not None:
            return self.hybrid.generate(prompts, mask, max_new_tokens=a.max_answer_seq_len, **sampling)
        was_training = self.actor.module.training
        self.actor.eval()
        out = self.actor.module.generate(
            input_ids=prompts, attention_mask=mask, max_new_tokens=a.max_answer_seq_len,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            synced_gpus=self.actor.zero_optimization_stage() == 3 and dist.world_size() > 1, **sampling)
        self.actor.train(was_training)
        # generate pads rows that ended early; it stops once all have ended, so pad to the width
        return pad_to_width(out, prompts.size(1) + a.max_answer_seq_len, self.pad_token_id)

    def _answer_log_probs(self, model, seq, attention_mask, prompt_len: int, with_entropy: bool = False):
        """(B, A) log-probs of the answer tokens (and their entropy) under `model`."""
        answers = seq[:, prompt_len:]
        logits = lm_logits(model, seq, attention_mask, last=answers.size(1) + 1)[:, :-1]
        if self.args.temperature != 1.0:  # score the distribution the answers were sampled from
            logits = logits / self.args.temperature
        log_probs = log_probs_from_logits(logits, answers)
        if not with_entropy:
            return log_probs
        with torch.no_grad():
            return log_probs, entropy_from_logits(logits)

    def _values(self, model, seq, attention_mask, prompt_len: int) -> torch.Tensor:
        """(B, A) critic values of the states before each answer token."""
        values = model(seq, attention_mask, position_ids=position_ids_from_mask(attention_mask))
        return values[:, prompt_len - 1:-1].float()

    def _scores(self, prompts, seq, attention_mask, action_mask) -> torch.Tensor:
        if self.reward_fn is not None:
            return self.reward_fn(prompts, seq, attention_mask, action_mask).to(seq.device).float()
        values = self.reward(seq, attention_mask, position_ids=position_ids_from_mask(attention_mask))
        return end_scores(values, attention_mask).float()

    @torch.no_grad()
    def generate_experience(self, prompts, mask: torch.Tensor | None = None, step: int = 0) -> Experience:
        """Answer a prompt batch and score it. `prompts` is a DataCollatorPrompt batch
        ({"prompt", "prompt_att_mask"}) or, as in DeepSpeed-Chat, the two tensors. With
        --samples_per_prompt K the experience has K rows per prompt, each prompt's rows together."""
        if isinstance(prompts, dict):
            prompts, mask = prompts["prompt"], prompts["prompt_att_mask"]
        device = dist.current_device()
        prompts, mask = prompts.to(device), mask.to(device)
        k = getattr(self.args, "samples_per_prompt", 1)
        if k > 1:  # each prompt's answers in consecutive rows: the groups of rloo / grpo
            prompts, mask = prompts.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        start = time.perf_counter()
        seq = self._generate(prompts, mask)
        self.last_generation_s = time.perf_counter() - start
        prompt_len = prompts.size(1)
        answers = seq[:, prompt_len:]
        action_mask = (torch.ones_like(answers, dtype=torch.bool) if self.eos_token_id is None
                       else answer_mask(answers, self.eos_token_id, self.pad_token_id))
        # drop the columns after the longest answer: every later forward skips the padding
        width = answer_width(action_mask)
        seq, action_mask = seq[:, :prompt_len + width], action_mask[:, :width]
        attention_mask = torch.cat([mask, action_mask.long()], 1)

        models = [self.actor, *([self.critic] if self.uses_critic else [])]
        for model in models:
            model.eval()
        log_probs = self._answer_log_probs(self.actor, seq, attention_mask, prompt_len)
        ref_log_probs = self._answer_log_probs(self.ref, seq, attention_mask, prompt_len)
        values = (self._values(self.critic, seq, attention_mask, prompt_len) * action_mask if self.uses_critic
                  else torch.zeros_like(log_probs))
        scores = self._scores(prompts, seq, attention_mask, action_mask)
        for model in models:
            model.train()

        a = self.args
        # with the KL as a loss term the reward is the score alone
        kl_coef = 0.0 if self.kl_in_loss else self.kl_coef
        rewards = kl_penalized_rewards(log_probs, ref_log_probs, scores, action_mask, kl_coef, a.clip_reward_value)
        if self.uses_critic:
            advantages, returns = gae_advantages(values, rewards, action_mask, a.gamma, a.lam)
        else:  # each answer against the other answers to its prompt
            kl_returns = None if self.kl_in_loss else -kl_coef * masked_sum(log_probs - ref_log_probs, action_mask, 1)
            per_answer = group_advantages(scores.clamp(-a.clip_reward_value, a.clip_reward_value), a.samples_per_prompt,
                                          a.advantage, getattr(a, "scale_rewards", "group"), kl_returns)
            advantages = per_answer.unsqueeze(1) * action_mask.float()
            returns = torch.zeros_like(advantages)
        if a.whiten_advantages:
            advantages = whiten(advantages, action_mask)
        return Experience(prompts=prompts, seq=seq, attention_mask=attention_mask, action_mask=action_mask,
                          log_probs=log_probs, ref_log_probs=ref_log_probs, values=values, scores=scores,
                          rewards=rewards, advantages=advantages, returns=returns)

    # ---------------------------------------------------------------- update

    # DeepSpeed-Chat's trainer steps the actor after its PPO loss; with ptx (the subclass) the
    # actor's step waits for train_unsupervised, so both losses make one optimizer step.
    ptx_follows = False

    def train_rlhf(self, exp: Experience, boundary: bool = True,
                   step_tokens: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One PPO micro-batch of actor and critic on `exp`; returns (actor loss, critic loss).

        `boundary`: this micro-batch ends a gradient accumulation, so the models step (the loop
        decides; DeepSpeed's own count is not used). `step_tokens`: with --loss_aggregation
        dapo, the answer tokens of the whole optimizer step on all processes."""
        a = self.args
        log_probs, entropy = self._answer_log_probs(self.actor, exp.seq, exp.attention_mask,
                                                    exp.prompt_len, with_entropy=True)
        per_token = clipped_surrogate(log_probs, exp.log_probs, exp.advantages, exp.action_mask, a.cliprange,
                                      getattr(a, "cliprange_high", None) or None)
        if self.kl_in_loss:
            per_token = per_token + self.kl_coef * k3_kl(log_probs, exp.ref_log_probs, exp.action_mask)
        actor_loss = aggregate_loss(per_token, exp.action_mask, getattr(a, "loss_aggregation", "token"),
                                    max_len=a.max_answer_seq_len,
                                    normalizer=self._dapo_normalizer(self.actor, step_tokens))
        # a NaN/inf loss contributes nothing (a zero gradient through log_probs keeps DeepSpeed's
        # accumulation intact); the loop counts the micro-batch as skipped
        actor_applied = self.strategy.backward_and_step(self.actor, actor_loss, log_probs,
                                          boundary=boundary and not self.ptx_follows)
        self.last_entropy = masked_mean(entropy, exp.action_mask).item()
        # how far this update's policy already is from the rollout's (0 on the first micro-step)
        self.last_policy_shift = masked_mean((exp.log_probs - log_probs.detach()).abs(), exp.action_mask).item()

        if not self.uses_critic:
            self.last_update_skipped = not actor_applied
            return actor_loss.detach(), torch.zeros(())
        values = self._values(self.critic, exp.seq, exp.attention_mask, exp.prompt_len)
        critic_loss = value_loss(values, exp.values, exp.returns, exp.action_mask, a.cliprange_value)
        critic_applied = self.strategy.backward_and_step(self.critic, critic_loss, values, boundary=boundary)
        self.last_update_skipped = not (critic_applied and actor_applied)
        return actor_loss.detach(), critic_loss.detach()

    @staticmethod
    def _dapo_normalizer(engine, step_tokens: float | None) -> float | None:
        """DeepSpeed divides each micro-batch's loss by its accumulation steps and averages the
        processes' gradients: undo both, so the step's gradient is the sum over its tokens
        divided by their number."""
        if step_tokens is None:
            return None
        return step_tokens / (engine.gradient_accumulation_steps() * dist.world_size())

    @staticmethod
    def experience_stats(exp: Experience) -> dict:
        """Means over the batch: reward model score, KL to the reference (summed over each
        answer), total shaped reward, answer length."""
        mask = exp.action_mask
        return {"reward": exp.scores.mean().item(),
                "kl": masked_sum(exp.log_probs - exp.ref_log_probs, mask, dim=1).mean().item(),
                "shaped_return": masked_sum(exp.rewards, mask, dim=1).mean().item(),
                "answer_len": mask.float().sum(1).mean().item()}


class DeepSpeedPPOTrainerUnsupervised(DeepSpeedPPOTrainer):
    """PPO plus InstructGPT's "ptx" term: a language-model loss on plain text, weighted by
    `--unsup_coef`. Its gradient joins the PPO gradient of the same micro-batch: one actor
    optimizer step for both (as in DeepSpeed-Chat), so the LR schedule counts PPO's steps."""

    ptx_follows = True

    def train_unsupervised(self, batch: dict, unsup_coef: float, boundary: bool = True) -> torch.Tensor:
        batch = to_device(batch, dist.current_device())
        logits = self.actor(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                            use_cache=False).logits
        loss = causal_lm_loss(logits, batch["labels"], fp32=self.args.compute_fp32_loss)
        self.last_ptx_applied = self.strategy.backward_and_step(self.actor, unsup_coef * loss, logits, boundary=boundary)
        return loss.detach()


def kl_penalty_mode(args) -> str:
    """Where the KL to the reference enters: 'reward' (shaped into the per-token reward, as
    InstructGPT/DeepSpeed-Chat and RLOO do) or 'loss' (a k3 term in the actor's loss, as GRPO
    does); --kl_penalty auto picks 'loss' for grpo, 'reward' otherwise."""
    mode = getattr(args, "kl_penalty", "auto")
    if mode == "auto":
        return "loss" if getattr(args, "advantage", "gae") == "grpo" else "reward"
    return mode
