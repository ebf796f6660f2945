"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answers.

Run from the repository root:
    python -m training.step1_supervised_finetuning.main --model_name_or_path tiny-llama
    deepspeed --num_gpus 2 --module training.step1_supervised_finetuning.main --zero_stage 3
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run Step 1 from the repository root as "
                     "`python -m training.step1_supervised_finetuning.main`")

from dataclasses import dataclass, field

from utils.config import (CheckpointConfig, ConfigError, DataConfig, LogConfig, LoRAConfig, ModelConfig, OptimConfig,
                          RuntimeConfig, ZeroConfig, doc, parse_config, validate_training)


@dataclass
class SFTConfig(CheckpointConfig, LogConfig, ZeroConfig, RuntimeConfig, OptimConfig, LoRAConfig, ModelConfig, DataConfig):
    upstream_step = "step1"  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    response_loss_only: bool = field(default=False, metadata=doc(
        "Take the loss on answer tokens only (prompt tokens are masked out)."))
    def validate(self) -> None:
        validate_training(self, default_output_dir="output/step1_sft")


def main(argv=None) -> None:
    cfg = parse_config(SFTConfig, argv, description=__doc__.splitlines()[0])
    # Imports after parsing so `--help` and config errors answer at once.
    from tqdm import tqdm

    from utils import dist
    from utils.data import DataCollatorSFT, create_prompt_dataset
    from utils.model import apply_lora, load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
    from utils.train_utils import (causal_lm_loss, evaluate_lm, finish_run, fit,
                                   make_loaders, run_logger, start_run, train_spec, to_device, total_optimizer_steps)

    strategy = start_run(cfg)
    device = dist.current_device()
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(model_path, tokenizer, dtype=resolve_dtype(cfg.dtype, device.type),
                           dropout=cfg.dropout, trust_remote_code=cfg.trust_remote_code,
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
    train_loader, train_sampler, eval_loader = make_loaders(
        train_ds, eval_ds, DataCollatorSFT(tokenizer.pad_token_id), cfg)
    total_steps = total_optimizer_steps(train_loader, cfg)
    engine, scheduler = strategy.prepare_trained(model, train_spec(cfg, total_steps))
    logger = run_logger(cfg)
    say = tqdm.write if dist.is_main() else (lambda *_: None)
    say(f"step1: {len(train_ds)} train / {len(eval_ds)} eval examples, {total_steps} optimizer steps, "
        f"{dist.world_size()} process(es), ZeRO-{cfg.zero_stage}, {cfg.dtype}")
    if len(eval_ds) == 0:
        say("step1: warning: no held-out examples in this step's share; perplexity is not evaluated")

    def loss_fn(batch):
        batch = to_device(batch, device)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = causal_lm_loss(logits, batch["labels"], fp32=cfg.compute_fp32_loss)
        return loss, batch["input_ids"].size(0), {}

    def evaluate():
        return evaluate_lm(engine, eval_loader, device) if len(eval_ds) else {}

    step, evals = fit(strategy, engine, scheduler, cfg, "step1", train_loader, train_sampler, total_steps,
                      loss_fn, evaluate, logger)
    finish_run(strategy, engine, tokenizer, cfg, logger, "step1", step, evals, headline="perplexity")


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
