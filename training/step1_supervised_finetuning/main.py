"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answers.

Run from the repository root:
    python -m training.step1_supervised_finetuning.main --model_name_or_path tiny-llama
    deepspeed --num_gpus 2 --module training.step1_supervised_finetuning.main --zero_stage 3
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run Step 1 from the repository root as "
                     "`python -m training.step1_supervised_finetuning.main`")

import math
import time
from dataclasses import asdict, dataclass, field

from utils.config import (DataConfig, LogConfig, LoRAConfig, ModelConfig, OptimConfig,
                          RuntimeConfig, ConfigError, cache_dir, doc, parse_config, parse_data_split)


@dataclass
class SFTConfig(LogConfig, RuntimeConfig, OptimConfig, LoRAConfig, ModelConfig, DataConfig):
    response_loss_only: bool = field(default=False, metadata=doc(
        "Take the loss on answer tokens only (prompt tokens are masked out)."))
    eval_interval: int = field(default=0, metadata=doc(
        "Also evaluate every this many optimizer steps (0 = before training and after each epoch)."))

    def validate(self) -> None:
        parse_data_split(self.data_split)
        if not self.output_dir:
            self.output_dir = "output/step1_sft"
        if not self.data_output_path:
            self.data_output_path = str(cache_dir() / "data")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if self.only_optimize_lora and self.lora_dim <= 0:
            raise ConfigError("--only_optimize_lora needs --lora_dim > 0")


def main(argv=None) -> None:
    cfg = parse_config(SFTConfig, argv, description=__doc__.splitlines()[0])
    # Imports after parsing so `--help` and config errors answer at once.
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    from utils import ds_utils as ds
    from utils.data import DataCollatorSFT, create_prompt_dataset
    from utils.metrics import MetricsLogger
    from utils.model import (apply_lora, load_causal_lm, load_tokenizer, resolve_dtype,
                             resolve_dtype_name, resolve_model_path)
    from utils.train_utils import causal_lm_loss, check_finite, evaluate_lm, to_device

    ds.check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    device = ds.init_distributed(cfg.local_rank)
    cfg.dtype = resolve_dtype_name(cfg.dtype, device.type)
    dtype = resolve_dtype(cfg.dtype, device.type)
    ds.set_seed(cfg.seed)

    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(model_path, tokenizer, dtype=dtype, dropout=cfg.dropout,
                           trust_remote_code=cfg.trust_remote_code,
                           gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora_dim > 0:
        model = apply_lora(model, cfg.lora_dim, cfg.lora_module_name, cfg.lora_alpha,
                           cfg.only_optimize_lora)

    train_ds, eval_ds = create_prompt_dataset(
        cfg.data_path, cfg.data_split, cfg.data_output_path, 1, cfg.seed, tokenizer, cfg.max_seq_len,
        eos_token_id=tokenizer.eos_token_id if cfg.add_eot_token else None,
        sft_only_data_path=cfg.sft_only_data_path, num_examples=cfg.num_examples,
        response_loss_only=cfg.response_loss_only)
    if len(train_ds) == 0:
        raise ConfigError("Step 1 has no training examples: check --data_path and --data_split")
    collate = DataCollatorSFT(tokenizer.pad_token_id)
    train_sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size,
                              sampler=train_sampler, collate_fn=collate)
    eval_loader = DataLoader(eval_ds, batch_size=cfg.per_device_eval_batch_size,
                             sampler=DistributedSampler(eval_ds, shuffle=False), collate_fn=collate)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_train_epochs
    optimizer = ds.build_optimizer(model, cfg.learning_rate, cfg.weight_decay,
                                   cfg.lora_learning_rate, cfg.offload)
    scheduler = ds.build_scheduler(optimizer, cfg.lr_scheduler_type, cfg.num_warmup_steps, total_steps)
    ds_config = ds.train_ds_config(
        micro_batch=cfg.per_device_train_batch_size, grad_accum=cfg.gradient_accumulation_steps,
        zero_stage=cfg.zero_stage, offload=cfg.offload, dtype=cfg.dtype, grad_clip=cfg.max_grad_norm,
        user_config=ds.load_user_ds_config(cfg.deepspeed_config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)

    log_dir = f"{cfg.output_dir}/{ds.LOG_SUBDIR}"
    logger = MetricsLogger(log_dir, enabled=ds.is_main(), tensorboard=cfg.enable_tensorboard,
                           tensorboard_dir=cfg.tensorboard_path or None)
    say = tqdm.write if ds.is_main() else (lambda *_: None)
    say(f"step1: {len(train_ds)} train / {len(eval_ds)} eval examples, {total_steps} optimizer steps, "
        f"{ds.world_size()} process(es), ZeRO-{cfg.zero_stage}, {cfg.dtype}")
    if len(eval_ds) == 0:
        say("step1: warning: no held-out examples in this step's share; perplexity is not evaluated")

    evals: list[dict] = []

    def run_eval(step: int) -> None:
        if len(eval_ds) == 0:
            return
        result = evaluate_lm(engine, eval_loader, device)
        logger.log(step, result, prefix="eval/")
        say(f"step1 eval @ step {step}: loss {result['loss']:.4f} perplexity {result['perplexity']:.2f}")
        evals.append(result)

    run_eval(0)
    step, window = 0, _ThroughputWindow()
    progress = tqdm(total=total_steps, desc="step1 SFT", disable=cfg.disable_tqdm or not ds.is_main())
    engine.train()
    for epoch in range(cfg.num_train_epochs):
        train_sampler.set_epoch(epoch)
        for micro_step, batch in enumerate(train_loader):
            batch = to_device(batch, device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = causal_lm_loss(logits, batch["labels"], fp32=cfg.compute_fp32_loss)
            check_finite(loss, step)
            engine.backward(loss)
            engine.step()
            window.add(batch, loss.item())
            if (micro_step + 1) % cfg.gradient_accumulation_steps:
                continue
            step += 1
            progress.update(1)
            if cfg.print_loss:
                say(f"epoch {epoch} step {step} loss {loss.item():.4f}")
            if step % cfg.log_interval == 0 or step == total_steps:
                metrics = {**window.flush(), "lr": scheduler.get_last_lr()[0], "epoch": epoch}
                logger.log(step, metrics, prefix="train/")
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            if cfg.eval_interval and step % cfg.eval_interval == 0:
                run_eval(step)
            if step >= total_steps:
                break
        if not cfg.eval_interval or step % cfg.eval_interval:
            run_eval(step)
        if step >= total_steps:
            break
    progress.close()

    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    summary = {"steps": step, "eval_loss_before": first.get("loss"), "eval_loss_after": last.get("loss"),
               "perplexity_before": first.get("perplexity"), "perplexity_after": last.get("perplexity")}
    ds.save_hf_model(engine, tokenizer, cfg.output_dir,
                     extra_json={"training_config.json": asdict(cfg), "training_summary.json": summary})
    change = (f"perplexity {first['perplexity']:.2f} -> {last['perplexity']:.2f}; " if evals else "")
    say(f"step1 done: {change}model saved to {cfg.output_dir}")
    logger.close()
    ds.shutdown_distributed()


class _ThroughputWindow:
    """Mean loss and samples/tokens per second since the last flush (this process)."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.start, self.losses, self.samples, self.tokens = time.perf_counter(), [], 0, 0

    def add(self, batch: dict, loss: float) -> None:
        self.losses.append(loss)
        self.samples += batch["input_ids"].size(0)
        self.tokens += int(batch["attention_mask"].sum())

    def flush(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"loss": sum(self.losses) / max(len(self.losses), 1),
               "samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed}
        self._reset()
        return out


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
