"""A training run's set-up and close, shared by all steps: the output folder, the process group,
the dtype, the DeepSpeed settings checked up front, seeds, the metrics log, and the final save."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from utils import checkpoint, dist
from utils.config import ConfigError
from utils.fs import LOG_SUBDIR, WriteRefused, check_output_dir
from utils.metrics import MetricsLogger
from utils.strategy import DeepSpeedStrategy, TrainSpec


@dataclass(frozen=True)
class EngineSettings:
    """One trained engine's batch and ZeRO settings as start_run checks them, with the flags that
    set them (Step 3's actor: --actor_zero_stage, --per_device_training_batch_size), for messages."""
    zero_stage: int
    micro_batch: int
    zero_stage_flag: str = "--zero_stage"
    micro_batch_flag: str = "--per_device_train_batch_size"


def start_run(cfg, engines: tuple[EngineSettings, ...] | None = None) -> DeepSpeedStrategy:
    """Refuse a used output folder, join the process group, settle the dtype, check the trained
    engines' settings (default: the one-model steps' engine, --zero_stage and
    --per_device_train_batch_size), seed everything. Returns the run's strategy."""
    # --resume continues in the folder it left, so a used folder is expected there
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir or cfg.resume)
    strategy = DeepSpeedStrategy(cfg.dtype, cfg.deepspeed_config)
    strategy.setup_distributed(cfg.local_rank)
    cfg.dtype = strategy.dtype
    for engine in engines or (EngineSettings(cfg.zero_stage, cfg.per_device_train_batch_size),):
        check_engine_config(strategy, cfg, engine)
    dist.set_seed(cfg.seed)
    return strategy


def check_engine_config(strategy: DeepSpeedStrategy, cfg, engine: EngineSettings) -> dict:
    """A trained engine's DeepSpeed config, built before any model or data is loaded so that a
    combination it cannot run (--offload without ZeRO, fp16 without CUDA, batch sizes in
    --deepspeed_config that disagree with the flags) is refused before any work; errors name
    the engine's flags."""
    accumulation = cfg.gradient_accumulation_steps
    if cfg.offload and engine.zero_stage == 0:
        raise ConfigError(f"--offload needs ZeRO stage 1, 2 or 3 ({engine.zero_stage_flag})")
    user = strategy.user_config
    config = strategy.train_config(TrainSpec(lr=0.0, weight_decay=0.0, lora_lr=0.0, zero_stage=engine.zero_stage,
                                             micro_batch=engine.micro_batch, grad_accum=accumulation,
                                             offload=cfg.offload))
    for key, flag, value in (("train_micro_batch_size_per_gpu", engine.micro_batch_flag, engine.micro_batch),
                             ("gradient_accumulation_steps", "--gradient_accumulation_steps", accumulation)):
        if key in user and user[key] != value:
            raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config} sets {key} {user[key]} but {flag} is "
                              f"{value}: set batch sizes with the flags")
    expected = engine.micro_batch * accumulation * dist.world_size()
    if config["train_batch_size"] != expected:
        raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config} sets train_batch_size "
                          f"{config['train_batch_size']}, which is not {engine.micro_batch_flag} "
                          f"{engine.micro_batch} x --gradient_accumulation_steps "
                          f"{accumulation} x {dist.world_size()} process(es) = {expected}")
    return config


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: otherwise each new iterator draws its base seed from the
    global RNG, which shifts dropout and sampling after a resume (iterators start elsewhere)."""
    return torch.Generator().manual_seed(seed)


def run_logger(cfg):
    return MetricsLogger(f"{cfg.output_dir}/{LOG_SUBDIR}", enabled=dist.is_main(),
                         tensorboard=cfg.enable_tensorboard, tensorboard_dir=cfg.tensorboard_path or None)


def final_save_refused(err, output_dir, held: str, what: str):
    """The one line for a final save the disk refused: `err`, then `held` (what the output
    folder still holds), then how to finish: rerun with --resume from the newest checkpoint,
    which saves `what`, or, with no checkpoint, that the trained weights are lost."""
    newest = checkpoint.latest(output_dir)
    return WriteRefused(f"{err}; {held}" + (
        f", with the newest checkpoint {newest}: make room and rerun with --resume to save {what}"
        if newest else "; the trained weights are lost (--save_steps keeps checkpoints to resume from)"))


def finish_run(strategy: DeepSpeedStrategy, engine, tokenizer, cfg, logger, name: str, steps: int, evals: list[dict],
               headline: str) -> dict:
    """Save the model with its config and a summary (each eval metric before and after
    training), print one closing line, close the logs and leave the process group."""
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    summary = {"steps": steps, **{f"{k}_before": v for k, v in first.items()},
               **{f"{k}_after": v for k, v in last.items()}}
    try:
        strategy.save_hf_model(engine, tokenizer, cfg.output_dir, keep=logger.entries_in(cfg.output_dir),
                               extra_json={"training_config.json": asdict(cfg), "training_summary.json": summary})
    except WriteRefused as err:  # e.g. a full disk: the folder keeps what it held, say how to finish
        raise final_save_refused(err, cfg.output_dir, f"{cfg.output_dir} holds what it held before",
                                 "the model") from err
    if dist.is_main():
        change = (f"{headline} {first[headline]:.4f} -> {last[headline]:.4f}; "
                  if evals and headline in first else "")
        tqdm.write(f"{name} done: {change}model saved to {cfg.output_dir}")
    logger.close()
    strategy.shutdown()
    return summary
