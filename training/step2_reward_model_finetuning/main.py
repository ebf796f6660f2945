"""Step 2: train a reward model on preference pairs (chosen vs rejected answers).

Run from the repository root:
    python -m training.step2_reward_model_finetuning.main --model_name_or_path output/step1_sft
    deepspeed --num_gpus 2 --module training.step2_reward_model_finetuning.main --zero_stage 3

The output folder is a Hugging Face `*ForSequenceClassification` model with one label: Step 3
loads it as reward model and critic, and other tools load it with AutoModelForSequenceClassification.
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run Step 2 from the repository root as "
                     "`python -m training.step2_reward_model_finetuning.main`")

from dataclasses import dataclass, field

from utils.config import (CheckpointConfig, ConfigError, DataConfig, LogConfig, LoRAConfig, ModelConfig, OptimConfig,
                          RuntimeConfig, ZeroConfig, doc, parse_config, validate_training)


@dataclass
class RewardConfig(CheckpointConfig, LogConfig, ZeroConfig, RuntimeConfig, OptimConfig, LoRAConfig, ModelConfig, DataConfig):
    upstream_step = "step2"  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    loss: str = field(default="pairwise", metadata=doc(
        "pairwise: -log sigmoid(r_chosen - r_rejected) on the last-token rewards; divergence: "
        "DeepSpeed-Chat's variant, averaged over the tokens after chosen and rejected diverge.",
        choices=("pairwise", "divergence")))
    num_padding_at_beginning: int = field(default=1, metadata=doc(
        "Accepted for DeepSpeed-Chat scripts and ignored: the attention mask marks real tokens, "
        "OPT's leading </s> included."))
    def validate(self) -> None:
        validate_training(self, default_output_dir="output/step2_reward")


def main(argv=None) -> None:
    cfg = parse_config(RewardConfig, argv, description=__doc__.splitlines()[0])
    import torch
    from tqdm import tqdm

    from utils import dist
    from utils.data import DataCollatorReward, create_prompt_dataset
    from utils.model import (apply_lora, divergence_loss, end_scores, load_reward_model, load_tokenizer,
                             pair_metrics, pairwise_loss, resolve_dtype, resolve_model_path)
    from utils.train_utils import (finish_run, fit, make_loaders, run_logger, start_run, train_spec,
                                   to_device, total_optimizer_steps)

    strategy = start_run(cfg)
    device = dist.current_device()
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_reward_model(model_path, tokenizer, dtype=resolve_dtype(cfg.dtype, device.type),
                              dropout=cfg.dropout, trust_remote_code=cfg.trust_remote_code,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora_dim > 0:
        model.hf_model = apply_lora(model.hf_model, cfg.lora_dim, cfg.lora_module_name, cfg.lora_alpha,
                                    cfg.only_optimize_lora)
        model.hf_model.score.weight.requires_grad_(True)  # the value head always trains

    train_ds, eval_ds = create_prompt_dataset(
        cfg.data_path, cfg.data_split, cfg.data_output_path, 2, cfg.seed, tokenizer, cfg.max_seq_len,
        eos_token_id=tokenizer.eos_token_id if cfg.add_eot_token else None, num_examples=cfg.num_examples)
    if len(train_ds) == 0:
        raise ConfigError("Step 2 has no preference pairs: check --data_path and --data_split")
    train_loader, train_sampler, eval_loader = make_loaders(
        train_ds, eval_ds, DataCollatorReward(tokenizer.pad_token_id), cfg)
    total_steps = total_optimizer_steps(train_loader, cfg)
    engine, scheduler = strategy.prepare_trained(model, train_spec(cfg, total_steps))
    logger = run_logger(cfg)
    say = tqdm.write if dist.is_main() else (lambda *_: None)
    say(f"step2: {len(train_ds)} train / {len(eval_ds)} eval pairs, {total_steps} optimizer steps, "
        f"{dist.world_size()} process(es), ZeRO-{cfg.zero_stage}, {cfg.dtype}, {cfg.loss} loss")

    def scores(batch):
        """(chosen rewards, rejected rewards, values, batch): the first half of the rows are chosen."""
        batch = to_device(batch, device)
        values = engine(batch["input_ids"], batch["attention_mask"])
        rewards = end_scores(values, batch["attention_mask"])
        half = rewards.size(0) // 2
        return rewards[:half], rewards[half:], values, batch

    def loss_fn(batch):
        chosen, rejected, values, batch = scores(batch)
        half = chosen.size(0)
        if cfg.loss == "divergence":
            ids, mask = batch["input_ids"], batch["attention_mask"]
            loss = divergence_loss(ids[:half], ids[half:], values[:half], values[half:], mask[:half], mask[half:])
        else:
            loss = pairwise_loss(chosen, rejected)
        return loss, half, {"accuracy": (chosen > rejected).float().mean().item()}

    @torch.no_grad()
    def evaluate():
        if len(eval_ds) == 0:
            return {}
        engine.eval()
        chosen_all, rejected_all = [], []
        for batch in eval_loader:
            chosen, rejected, _, _ = scores(batch)
            chosen_all.append(chosen.float())
            rejected_all.append(rejected.float())
        engine.train()
        chosen, rejected = dist.all_gather_cat(torch.cat(chosen_all)), dist.all_gather_cat(torch.cat(rejected_all))
        return {**pair_metrics(chosen, rejected), "loss": pairwise_loss(chosen, rejected).item()}

    step, evals = fit(strategy, engine, scheduler, cfg, "step2", train_loader, train_sampler, total_steps,
                      loss_fn, evaluate, logger)
    finish_run(strategy, engine, tokenizer, cfg, logger, "step2", step, evals, headline="accuracy")


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
