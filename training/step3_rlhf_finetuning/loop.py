"""Step 3's outer loop, top to bottom: set up (data, engines, trainer), then rounds of rollout ->
PPO update -> metrics, then the final models. The parts: data.py, rlhf_engine.py,
ppo_trainer.py (rollout.py, rewards.py, scoring.py, update.py), metrics.py, saving.py."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from tqdm import tqdm

from training.step3_rlhf_finetuning.config import Step3Config
from training.step3_rlhf_finetuning.data import (prompt_batches, prompt_loader, total_iterations,
                                                 unsupervised_batches)
from training.step3_rlhf_finetuning.experience import decoded
from training.step3_rlhf_finetuning.metrics import (PhaseFlops, mean, reduce_mean, reward_part_means, rollout_stats,
                                                    timing)
from training.step3_rlhf_finetuning.ppo_trainer import DeepSpeedPPOTrainer
from training.step3_rlhf_finetuning.rewards import GroundTruth, Given, ground_truth_for
from training.step3_rlhf_finetuning.rlhf_engine import DeepSpeedRLHFEngine
from training.step3_rlhf_finetuning.saving import STAGING, save_models
from training.step3_rlhf_finetuning.update import ppo_update
from utils import dist
from utils.allocator import keep_freed_blocks, release_freed_memory_if_tight
from utils.model import load_tokenizer, resolve_model_path
from utils.rl_math import adaptive_kl_coef
from utils.run import EngineSettings, run_logger, start_run
from utils.run_checkpoints import RunCheckpoints
from utils.stopping import NonFinite, StopRequest

__all__ = ["run", "STAGING"]

NONFINITE_ADVICE = "Lower --actor_learning_rate/--critic_learning_rate or use --dtype fp32"
LOGGED = ("reward", "gt_score", "kl", "actor_loss", "critic_loss", "answer_len")  # the round's console line


@dataclass
class Round:
    """What every round uses."""
    cfg: Step3Config
    trainer: DeepSpeedPPOTrainer
    unsup: object  # endless ptx batches, or None
    phase_flops: PhaseFlops
    truth: GroundTruth | None
    nonfinite: NonFinite
    say: object


def trained_engines(cfg: Step3Config) -> tuple[EngineSettings, ...]:
    """The actor's and critic's settings, checked before any data or model is loaded."""
    micro, flag = cfg.per_device_training_batch_size, "--per_device_training_batch_size"
    return (EngineSettings(cfg.actor.zero_stage, micro, "--actor_zero_stage", flag),
            EngineSettings(cfg.critic.zero_stage, micro, "--critic_zero_stage", flag))


def run(cfg: Step3Config, reward_fn: Given = None) -> dict:
    """The whole of Step 3; returns the summary (first/last round metrics)."""
    strategy = start_run(cfg, trained_engines(cfg))
    tokenizer = load_tokenizer(resolve_model_path(cfg.actor_model_name_or_path),
                               trust_remote_code=cfg.trust_remote_code)
    loader, sampler = prompt_loader(cfg, tokenizer)
    unsup = unsupervised_batches(cfg.ptx, cfg, tokenizer)
    rounds, optimizer_steps = total_iterations(cfg, loader)
    engine = DeepSpeedRLHFEngine(cfg.actor_model_name_or_path, cfg.critic_model_name_or_path, tokenizer,
                                 cfg, optimizer_steps, reward_model_name_or_path=cfg.reward_model_name_or_path or None,
                                 strategy=strategy)
    # the reward: reward_fn when given, else as cfg says (--reward_fn, --reward_source)
    trainer = DeepSpeedPPOTrainer(engine, cfg, reward_fn=reward_fn, ptx=unsup is not None)
    say = tqdm.write if dist.is_main() else (lambda *_: None)
    say(f"step3: {len(loader.dataset)} prompts, {rounds} rollout rounds of {cfg.answers_per_rank} answers "
        f"x {dist.world_size()} process(es), actor ZeRO-{engine.actor.zero_optimization_stage()}, "
        f"{f'critic ZeRO-{engine.critic.zero_optimization_stage()}' if engine.critic is not None else 'no critic'}, {cfg.dtype}, "
        f"hybrid engine {'on' if cfg.hybrid.enable_hybrid_engine else 'off'}")
    each = Round(cfg, trainer, unsup, PhaseFlops(engine, cfg.ppo_epochs, cfg.actor.gradient_checkpointing,
                                                 cfg.critic.gradient_checkpointing, trainer.recomputes_logprobs,
                                                 cfg.per_device_training_batch_size),
                 ground_truth_for(cfg.data_path, tokenizer),
                 NonFinite(cfg.max_nonfinite_steps, cfg.output_dir, NONFINITE_ADVICE), say)
    logger = run_logger(cfg)
    keep_freed_blocks()  # for the rounds' tensors; the models loaded under glibc's default
    first, last = train_rounds(each, engine, logger, loader, sampler, rounds)
    summary = {"rounds": rounds, **{f"{k}_first": v for k, v in first.items()},
               **{f"{k}_last": v for k, v in last.items()}} if first else {"rounds": 0}
    save_models(engine, tokenizer, cfg, summary)
    if dist.is_main() and first:
        say(f"step3 done: reward {first['reward']:.4f} -> {last['reward']:.4f}, "
            f"KL {last['kl']:.4f}; actor saved to {cfg.output_dir}/actor")
    logger.close()
    strategy.shutdown()
    return summary


def train_rounds(each: Round, engine, logger, loader, sampler, rounds: int) -> tuple[dict | None, dict | None]:
    """Rounds from the newest checkpoint (or the start) to the end, checkpointed as asked;
    (first, last) round metrics."""
    cfg, trainer = each.cfg, each.trainer
    trained = {"actor": engine.actor, "critic": engine.critic, "actor_ema": engine.actor_ema}
    checkpoints = RunCheckpoints(engine.strategy, {name: model for name, model in trained.items() if model is not None},
                                 cfg, "step3", each.say)
    state, _ = checkpoints.start(logger)
    trainer.kl_coef = state.extra.get("kl_coef", trainer.kl_coef)  # a resumed run's controller
    batches = prompt_batches(cfg, loader, sampler, state.step)
    if each.unsup is not None:  # the ptx batches the finished rounds used
        each.unsup = itertools.islice(each.unsup, state.step * cfg.micro_batches_per_round, None)
    progress = tqdm(total=rounds, initial=state.step, desc="step3", disable=cfg.disable_tqdm or not dist.is_main())
    with StopRequest() as stop:
        for round_index in range(state.step, rounds):
            metrics = one_round(each, [next(batches) for _ in range(cfg.generation_batches)], round_index)
            state.step = round_index + 1
            if cfg.ppo.target_kl > 0:  # the same on every rank: metrics are all-reduced
                trainer.kl_coef = state.extra["kl_coef"] = adaptive_kl_coef(
                    trainer.kl_coef, metrics["kl"], cfg.ppo.target_kl, cfg.answers_per_rank * dist.world_size(),
                    cfg.ppo.kl_horizon)
            state.extra.setdefault("first", metrics)
            state.extra["last"] = metrics
            logger.log(state.step, metrics, prefix="train/")
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}")
            if cfg.print_loss or state.step % cfg.log_interval == 0:
                shown = [*LOGGED, *sorted(k for k in metrics if k.startswith("reward_"))]  # each reward's mean
                each.say(f"step3 round {state.step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown
                                                                    if k in metrics))
            checkpoints.after_step(state, stop, progress)
    progress.close()
    checkpoints.at_end(state)
    return state.extra.get("first"), state.extra.get("last")


def one_round(each: Round, prompt_batches, round_index: int) -> dict:
    """Roll out generation_batches prompt batches, then update; one metrics row."""
    cfg, trainer = each.cfg, each.trainer
    start = time.perf_counter()
    exps, parts, diagnostics, gen_s = [], [], [], 0.0
    for batch in prompt_batches:
        # the update's critic forward gives the values when it is the round's only one
        # (generate_experience, the API, always scores them)
        rollout = trainer.rollout(batch, values_later=cfg.values_from_update)
        exps.append(rollout.experience)
        parts.append(rollout.reward_parts)
        diagnostics.append(rollout.stats)
        gen_s += rollout.generation_s
    release_freed_memory_if_tight()  # the rollouts' freed pages, before training's activations
    scoring_s = time.perf_counter() - start - gen_s
    if cfg.print_answers and dist.is_main() and round_index % cfg.print_answers_interval == 0:
        prompts, answers = decoded(trainer.tokenizer, exps[0])
        each.say(f"--- prompt: {prompts[0]!r}\n--- answer: {answers[0]!r} (score {exps[0].scores[0].item():.3f})")
    stats = {**rollout_stats(exps), **{k: mean([d[k] for d in diagnostics]) for k in diagnostics[0]}}
    if each.truth is not None:
        stats.update(each.truth(exps))
    train_start = time.perf_counter()
    losses = ppo_update(trainer, cfg, exps, each.unsup, each.nonfinite, round_index)
    release_freed_memory_if_tight()
    train_s = time.perf_counter() - train_start
    work = each.phase_flops.of(exps)
    times = timing(exps, work, gen_s, scoring_s, train_s, time.perf_counter() - start)
    return {**reduce_mean({**stats, **losses, **times, "kl_coef": trainer.kl_coef,
                           "lr_actor": trainer.rlhf_engine.actor_scheduler.get_last_lr()[0]}),
            **reward_part_means(parts)}
