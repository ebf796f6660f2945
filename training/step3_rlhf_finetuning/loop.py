"""Step 3's outer loop: data, engines, rollout -> PPO update rounds, metrics, saving."""
from __future__ import annotations

import itertools
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from training.step3_rlhf_finetuning.ppo_trainer import (DeepSpeedPPOTrainer,
                                                        DeepSpeedPPOTrainerUnsupervised, Experience)
from training.step3_rlhf_finetuning.rlhf_engine import DeepSpeedRLHFEngine
from utils import dist
from utils import flops
from utils.config import ConfigError
from utils.data import DataCollatorPrompt, DataCollatorSFT, create_prompt_dataset, get_unsupervised_dataset
from utils.fs import WriteRefused, refused_write, replace_directories
from utils.model import load_tokenizer, resolve_model_path
from utils.rl_math import adaptive_kl_coef
from utils.run import final_save_refused, loader_generator, run_logger, start_run
from utils.run_checkpoints import RunCheckpoints
from utils.stopping import NonFinite, StopRequest

# The trained engines' settings, checked before any data or model is loaded (start_run).
ENGINES = ({"zero_stage_flag": "--actor_zero_stage", "micro_batch_flag": "--per_device_training_batch_size"},
           {"zero_stage_flag": "--critic_zero_stage", "micro_batch_flag": "--per_device_training_batch_size"})
NONFINITE_ADVICE = "Lower --actor_learning_rate/--critic_learning_rate or use --dtype fp32"
STAGING = ".final-models"  # <output_dir>/.final-models/<model>: the final models, built before they replace the old


def prompt_loader(cfg, tokenizer):
    """Step 3's share of the prompts, left-padded, whole generation batches only."""
    train, _ = create_prompt_dataset(
        cfg.data_path, cfg.data_split, cfg.data_output_path, 3, cfg.seed, tokenizer,
        cfg.max_prompt_seq_len, num_examples=cfg.num_examples, max_prompt_seq_len=cfg.max_prompt_seq_len)
    per_round = cfg.per_device_generation_batch_size * dist.world_size()
    if len(train) < per_round:
        raise ConfigError(f"Step 3 has {len(train)} prompts, fewer than one generation batch "
                          f"({per_round}): check --data_path/--data_split or lower "
                          "--per_device_generation_batch_size")
    sampler = DistributedSampler(train, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train, batch_size=cfg.per_device_generation_batch_size, sampler=sampler,
                        collate_fn=DataCollatorPrompt(tokenizer.pad_token_id), drop_last=True,
                        generator=loader_generator(cfg.seed))
    return loader, sampler


def unsupervised_batches(cfg, tokenizer):
    """Endless ptx micro-batches (the text source is cycled), or None when ptx is off."""
    if not cfg.unsupervised_dataset_name:
        return None
    data = get_unsupervised_dataset(cfg.unsupervised_dataset_name, tokenizer, cfg.max_seq_len,
                                    cfg.data_output_path, cfg.seed,
                                    config_name=cfg.unsupervised_dataset_config_name or None)
    sampler = DistributedSampler(data, shuffle=True, seed=cfg.seed)
    loader = DataLoader(data, batch_size=cfg.per_device_training_batch_size, sampler=sampler,
                        collate_fn=DataCollatorSFT(tokenizer.pad_token_id), drop_last=False,
                        generator=loader_generator(cfg.seed))

    def forever():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from loader
    return forever()


def total_iterations(cfg, loader) -> tuple[int, int]:
    """(rollout rounds, optimizer steps of each trained model) for the whole run."""
    rounds = len(loader) // cfg.generation_batches * cfg.num_train_epochs
    if cfg.enable_test_mode:
        rounds = min(rounds, cfg.test_stop_step)
    if cfg.max_rounds:
        rounds = min(rounds, cfg.max_rounds)
    return rounds, max(1, rounds * optimizer_steps_per_round(cfg))


class PhaseFlops:
    """FLOPs of one round's phases (DeepSpeed-Chat paper counting), per process."""

    def __init__(self, engine: DeepSpeedRLHFEngine, cfg):
        self.actor_cfg = engine.actor.module.config
        scorer = engine.critic or engine.reward  # both start from the reward model
        self.critic_cfg = scorer.module.config if scorer is not None else None
        self.has_critic = engine.critic is not None
        # the critic's and the reward model's forwards (each left out when not run)
        self.critic_models = int(self.has_critic) + int(engine.reward is not None)
        self.actor_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                for p in engine.ref.module.parameters())
        self.cfg = cfg

    def of(self, exps: list[Experience]) -> dict:
        c = self.cfg
        gen = score = train = 0.0
        for exp in exps:
            b, p, seq_len = len(exp), exp.prompt_len, exp.seq.size(1)
            decoded = int(exp.action_mask.sum(1).max())
            gen += flops.generation_flops(self.actor_cfg, self.actor_params, b, p, decoded)
            score += 2 * flops.forward_flops(self.actor_cfg, b, seq_len)  # actor and reference
            train += c.ppo_epochs * flops.training_flops(self.actor_cfg, b, seq_len, c.actor_gradient_checkpointing)
            if self.critic_models:
                score += self.critic_models * flops.forward_flops(self.critic_cfg, b, seq_len)
            if self.has_critic:
                train += c.ppo_epochs * flops.training_flops(self.critic_cfg, b, seq_len,
                                                             c.critic_gradient_checkpointing)
        return {"generation": gen, "scoring": score, "training": train}


def accumulation_groups(n_micro: int, accumulation: int) -> list[range]:
    """The micro-batches of one round, in optimizer steps of `accumulation` each; the round's
    last step takes what is left, so every round ends with a step (its experience is not
    mixed into the next round's, and the schedule counts exactly these steps)."""
    return [range(start, min(start + accumulation, n_micro)) for start in range(0, n_micro, accumulation)]


def ppo_update(trainer, cfg, exps: list[Experience], unsup, nonfinite: NonFinite, round_index: int = 0) -> dict:
    """ppo_epochs passes over the round's experience in equal micro-batches, grouped into
    optimizer steps (accumulation_groups); the EMA follows each actor step. Mean losses. A
    micro-batch whose loss is NaN/inf contributed nothing (see train_rlhf): it is counted, left
    out of the means, and too many in a row stop the run (`round_index` names where)."""
    engine = trainer.rlhf_engine
    experience = Experience.concat(exps, trainer.pad_token_id)
    micro = [m for _ in range(cfg.ppo_epochs) for m in experience.split(cfg.per_device_training_batch_size)]
    actor_losses, critic_losses, unsup_losses, entropies, shifts = [], [], [], [], []
    for group in accumulation_groups(len(micro), cfg.gradient_accumulation_steps):
        tokens = step_token_count([micro[i] for i in group]) if cfg.loss_aggregation == "dapo" else None
        for i in group:
            boundary = i == group[-1]
            actor_loss, critic_loss = trainer.train_rlhf(micro[i], boundary=boundary, step_tokens=tokens)
            skipped = trainer.last_update_skipped
            if unsup is not None:
                unsup_loss = trainer.train_unsupervised(next(unsup), cfg.unsup_coef, boundary=boundary)
                skipped = skipped or not trainer.last_ptx_applied
                if trainer.last_ptx_applied:
                    unsup_losses.append(unsup_loss.item())
            # the skip was decided alike on every rank, so a raise here cannot hang the others
            if not nonfinite.skip(float("nan") if skipped else 0.0, round_index):
                actor_losses.append(actor_loss.item())
                critic_losses.append(critic_loss.item())
                entropies.append(trainer.last_entropy)
                shifts.append(trainer.last_policy_shift)
        if engine.actor_ema is not None:  # once per actor optimizer step, as --ema_decay says
            engine.strategy.update_ema(engine.actor, engine.actor_ema, cfg.ema_decay)
    out = {"actor_loss": _mean(actor_losses), "critic_loss": _mean(critic_losses), "entropy": _mean(entropies),
           "policy_shift": _mean(shifts), "first_policy_shift": shifts[0] if shifts else float("nan"),
           "skipped_nonfinite": nonfinite.total}
    if unsup_losses:
        out["unsup_loss"] = _mean(unsup_losses)
    return out


def step_token_count(micro_batches: list[Experience]) -> float:
    """Answer tokens of one optimizer step's micro-batches on all processes (DAPO's normalizer)."""
    count = torch.tensor([float(sum(int(m.action_mask.sum()) for m in micro_batches))], dtype=torch.float64,
                         device=dist.current_device())
    if dist.world_size() > 1:
        torch.distributed.all_reduce(count)
    return max(count.item(), 1.0)


def peak_memory_gb() -> float:
    """Peak accelerator memory on GPU, else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def _reduce_mean(metrics: dict) -> dict:
    """Average each metric over the processes (each rolled out its own prompts)."""
    if dist.world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=dist.current_device())
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / dist.world_size()).tolist()))


def print_answer(tokenizer, exp: Experience, say) -> None:
    prompts, answers = decoded(tokenizer, exp)
    say(f"--- prompt: {prompts[0]!r}\n--- answer: {answers[0]!r} (score {exp.scores[0].item():.3f})")


def decoded(tokenizer, exp: Experience) -> tuple[list[str], list[str]]:
    """(prompt texts, answer texts) of a rollout, special tokens and padding dropped."""
    return decode_rollout(tokenizer, exp.prompts, exp.seq, exp.action_mask)


def decode_rollout(tokenizer, prompts, seq, action_mask) -> tuple[list[str], list[str]]:
    texts = [tokenizer.decode(row[row != tokenizer.pad_token_id], skip_special_tokens=True) for row in prompts]
    answers = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
               for row, mask in zip(seq[:, prompts.size(1):], action_mask)]
    return texts, answers


def checker_reward(tokenizer):
    """reward_fn of `--reward_source checker`: the bundled task's checker score of each answer.
    A prompt the checker cannot parse (cut from the left by --max_prompt_seq_len) stops the run:
    scoring it 0 would teach the policy something false."""
    from utils.data import bundled

    def reward_fn(prompts, seq, attention_mask, action_mask) -> torch.Tensor:
        texts, answers = decode_rollout(tokenizer, prompts, seq, action_mask)
        for text in texts:
            if not bundled.is_task_prompt(text):
                raise ConfigError(f"--reward_source checker cannot score the prompt {text[-80:]!r}: it is "
                                  "not a whole bundled task prompt (raise --max_prompt_seq_len)")
        return torch.tensor(bundled.score_batch(texts, answers))
    return reward_fn


def ground_truth_score(tokenizer, exps: list[Experience]) -> dict:
    """Mean checker score of the answers (bundled task prompts only): the number that says
    whether the policy really got better, not only the reward model's view of it."""
    from utils.data import bundled

    scores = []
    for exp in exps:
        for prompt, answer in zip(*decoded(tokenizer, exp)):
            if bundled.is_task_prompt(prompt):  # a prompt cut from the left no longer parses
                scores.append(bundled.score(prompt, answer))
    return {"gt_score": _mean(scores) if scores else float("nan")}


def save_models(engine, tokenizer, cfg, summary: dict) -> None:
    """<output_dir>/actor, actor_ema (--enable_ema) and critic, all or none: each is built under
    <output_dir>/.final-models first, and only once all are built do they replace the old
    folders (fs.replace_directories). A write the disk refuses leaves every old folder as it
    was and ends in one line that says so and how to finish (--resume from the newest checkpoint)."""
    extra = {"training_config.json": asdict(cfg), "training_summary.json": summary}
    out = Path(cfg.output_dir)
    staging = out / STAGING
    models = {name: model for name, model in (("actor", engine.actor), ("actor_ema", engine.actor_ema),
                                               ("critic", engine.critic)) if model is not None}
    if dist.is_main():
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash while saving before
    try:
        for name, model in models.items():
            try:
                # the EMA is averaged in fp32 and saved in the training dtype, like the actor
                engine.strategy.save_hf_model(model, tokenizer, staging / name, extra_json=extra,
                                 dtype=engine.torch_dtype if name == "actor_ema" else None)
            except WriteRefused as err:  # name the model, not its staging folder
                if not isinstance(err.__cause__, OSError):
                    raise
                raise refused_write(err.__cause__, f"the final {name} model") from err
        if dist.is_main():
            replace_directories({staging / name: out / name for name in models})
    except WriteRefused as err:
        held = f"{', '.join(models)} in {out} hold what they held before (none was replaced)"
        raise final_save_refused(err, out, held, "the models") from err
    finally:
        if dist.is_main():
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


def run(cfg, reward_fn=None) -> dict:
    """The whole of Step 3; returns the summary (first/last round metrics)."""
    strategy = start_run(cfg, ENGINES)
    tokenizer = load_tokenizer(resolve_model_path(cfg.actor_model_name_or_path),
                               trust_remote_code=cfg.trust_remote_code)
    if reward_fn is None and cfg.reward_source == "checker":
        reward_fn = checker_reward(tokenizer)
    loader, sampler = prompt_loader(cfg, tokenizer)
    unsup = unsupervised_batches(cfg, tokenizer)
    rounds, optimizer_steps = total_iterations(cfg, loader)
    engine = DeepSpeedRLHFEngine(cfg.actor_model_name_or_path, cfg.critic_model_name_or_path, tokenizer,
                                 cfg, optimizer_steps, reward_model_name_or_path=cfg.reward_model_name_or_path or None,
                                 strategy=strategy)
    trainer_cls = DeepSpeedPPOTrainerUnsupervised if unsup is not None else DeepSpeedPPOTrainer
    trainer = trainer_cls(engine, cfg, reward_fn=reward_fn)
    phase_flops = PhaseFlops(engine, cfg)
    logger = run_logger(cfg)
    say = tqdm.write if dist.is_main() else (lambda *_: None)
    say(f"step3: {len(loader.dataset)} prompts, {rounds} rollout rounds of "
        f"{answers_per_rank(cfg)} answers "
        f"x {dist.world_size()} "
        f"process(es), actor ZeRO-{cfg.actor_zero_stage}, "
        f"{f'critic ZeRO-{cfg.critic_zero_stage}' if engine.critic is not None else 'no critic'}, {cfg.dtype}, "
        f"hybrid engine {'on' if cfg.enable_hybrid_engine else 'off'}")

    trained = {"actor": engine.actor, "critic": engine.critic, "actor_ema": engine.actor_ema}
    checkpoints = RunCheckpoints(strategy, {name: model for name, model in trained.items() if model is not None},
                                 cfg, "step3", say)
    state, _ = checkpoints.start(logger)
    trainer.kl_coef = state.extra.get("kl_coef", trainer.kl_coef)  # a resumed run's controller
    batches = itertools.islice(((epoch, batch) for epoch in range(cfg.num_train_epochs)
                                for batch in _epoch(loader, sampler, epoch)),
                               state.step * cfg.generation_batches, None)
    if unsup is not None:  # the ptx batches the finished rounds used
        unsup = itertools.islice(unsup, state.step * micro_batches_per_round(cfg), None)
    nonfinite = NonFinite(cfg.max_nonfinite_steps, cfg.output_dir, NONFINITE_ADVICE)
    progress = tqdm(total=rounds, initial=state.step, desc="step3", disable=cfg.disable_tqdm or not dist.is_main())
    with StopRequest() as stop:
        for round_index in range(state.step, rounds):
            metrics = one_round(trainer, cfg, [next(batches)[1] for _ in range(cfg.generation_batches)],
                                unsup, phase_flops, round_index, say, nonfinite)
            state.step = round_index + 1
            if cfg.target_kl > 0:  # the same on every rank: metrics are all-reduced
                trainer.kl_coef = state.extra["kl_coef"] = adaptive_kl_coef(
                    trainer.kl_coef, metrics["kl"], cfg.target_kl, answers_per_rank(cfg) * dist.world_size(),
                    cfg.kl_horizon)
            state.extra.setdefault("first", metrics)
            state.extra["last"] = metrics
            logger.log(state.step, metrics, prefix="train/")
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}")
            if cfg.print_loss or state.step % cfg.log_interval == 0:
                say(f"step3 round {state.step}: " + ", ".join(
                    f"{k} {metrics[k]:.4g}" for k in ("reward", "gt_score", "kl", "actor_loss", "critic_loss",
                                                       "answer_len") if k in metrics))
            checkpoints.after_step(state, stop, progress)
    progress.close()
    checkpoints.at_end(state)
    first, last = state.extra.get("first"), state.extra.get("last")
    summary = {"rounds": rounds, **{f"{k}_first": v for k, v in first.items()},
               **{f"{k}_last": v for k, v in last.items()}} if first else {"rounds": 0}
    save_models(engine, tokenizer, cfg, summary)
    if dist.is_main() and first:
        say(f"step3 done: reward {first['reward']:.4f} -> {last['reward']:.4f}, "
            f"KL {last['kl']:.4f}; actor saved to {cfg.output_dir}/actor")
    logger.close()
    strategy.shutdown()
    return summary


def answers_per_rank(cfg) -> int:
    """Answers each process samples per round."""
    return cfg.per_device_generation_batch_size * cfg.generation_batches * cfg.samples_per_prompt


def micro_batches_per_round(cfg) -> int:
    """PPO micro-batches per round (each also consumes one ptx batch when ptx is on)."""
    return answers_per_rank(cfg) // cfg.per_device_training_batch_size * cfg.ppo_epochs


def optimizer_steps_per_round(cfg) -> int:
    """Optimizer steps of the actor (and critic) per round: see accumulation_groups."""
    return math.ceil(micro_batches_per_round(cfg) / cfg.gradient_accumulation_steps)


def _epoch(loader, sampler, epoch: int):
    sampler.set_epoch(epoch)
    yield from loader


def one_round(trainer, cfg, prompt_batches, unsup, phase_flops: PhaseFlops, round_index: int, say,
              nonfinite: NonFinite) -> dict:
    """Roll out generation_batches prompt batches, then update; one metrics row."""
    start = time.perf_counter()
    exps, gen_s = [], 0.0
    for batch in prompt_batches:
        exps.append(trainer.generate_experience(batch, step=round_index))
        gen_s += trainer.last_generation_s
    scoring_s = time.perf_counter() - start - gen_s
    if cfg.print_answers and dist.is_main() and round_index % cfg.print_answers_interval == 0:
        print_answer(trainer.tokenizer, exps[0], say)
    per_exp = [DeepSpeedPPOTrainer.experience_stats(e) for e in exps]
    stats = {k: _mean([st[k] for st in per_exp]) for k in per_exp[0]}
    if all(path == "bundled" for path in cfg.data_path):  # the same on every rank (all-reduced)
        stats.update(ground_truth_score(trainer.tokenizer, exps))
    train_start = time.perf_counter()
    losses = ppo_update(trainer, cfg, exps, unsup, nonfinite, round_index)
    train_s = time.perf_counter() - train_start
    work = phase_flops.of(exps)
    total_s = time.perf_counter() - start
    generated = sum(int(e.action_mask.sum()) for e in exps)
    timing = {"generation_s": gen_s, "scoring_s": scoring_s, "training_s": train_s, "round_s": total_s,
              "samples_per_s": sum(len(e) for e in exps) / total_s, "generated_tokens": generated,
              "generation_tokens_per_s": generated / max(gen_s, 1e-9),
              "generation_tflops": work["generation"] / max(gen_s, 1e-9) / 1e12,
              "training_tflops": work["training"] / max(train_s, 1e-9) / 1e12,
              "tflops": sum(work.values()) / total_s / 1e12, "peak_memory_gb": peak_memory_gb()}
    return _reduce_mean({**stats, **losses, **timing, "lr_actor": trainer.rlhf_engine.actor_scheduler.get_last_lr()[0],
                          "kl_coef": trainer.kl_coef})
