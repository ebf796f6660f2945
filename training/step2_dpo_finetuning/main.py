"""Step 2 (alternative): Direct Preference Optimization of the actor on preference pairs.

Instead of a reward model plus PPO, DPO trains the Step 1 model directly on the same (chosen,
rejected) pairs Step 2 uses, against a frozen reference copy of it. The output is an actor that
chat.py loads like a Step 1 or Step 3 model.

Run from the repository root:
    python -m training.step2_dpo_finetuning.main --model_name_or_path output/step1_sft
    deepspeed --num_gpus 2 --module training.step2_dpo_finetuning.main --zero_stage 3
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run DPO from the repository root as "
                     "`python -m training.step2_dpo_finetuning.main`")

from dataclasses import dataclass, field

from utils.config import (CheckpointConfig, ConfigError, DataConfig, LogConfig, LoRAConfig, ModelConfig, OptimConfig,
                          RuntimeConfig, ZeroConfig, doc, parse_config, validate_training)


@dataclass
class DPOConfig(CheckpointConfig, LogConfig, ZeroConfig, RuntimeConfig, OptimConfig, LoRAConfig, ModelConfig, DataConfig):
    upstream_step = "dpo"  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    beta: float = field(default=0.1, metadata=doc(
        "Strength of the pull towards the reference: implicit reward = beta * log(pi / pi_ref)."))
    label_smoothing: float = field(default=0.0, metadata=doc(
        "Assumed probability that a pair's preference label is flipped (conservative DPO), in [0, 0.5)."))
    ref_model_name_or_path: str = field(default="", metadata=doc(
        "Reference model (default: --model_name_or_path). With --only_optimize_lora and no "
        "reference given, the reference is the same model with its LoRA adapters switched off."))
    offload_reference_model: bool = field(default=False, metadata=doc(
        "Keep the reference model's parameters in CPU memory (ZeRO-3 parameter offload)."))
    # DPO compares log-probs of the policy and the reference: dropout only adds noise to that.
    dropout: float | None = field(default=0.0, metadata=doc(
        "Set every dropout probability of the model to this value (DPO default: 0, no dropout)."))
    learning_rate: float = field(default=5e-6, metadata=doc("Peak learning rate."))

    def validate(self) -> None:
        validate_training(self, default_output_dir="output/step2_dpo")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def main(argv=None) -> None:
    cfg = parse_config(DPOConfig, argv, description=__doc__.splitlines()[0])
    import torch
    from tqdm import tqdm

    from utils import dist
    from utils.data import DataCollatorReward, create_prompt_dataset
    from utils.model import apply_lora, load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
    from utils.rl_math import answer_token_mask, dpo_loss, sequence_log_probs
    from utils.train_utils import (finish_run, fit, make_loaders, run_logger, start_run, train_spec,
                                   to_device, total_optimizer_steps)

    strategy = start_run(cfg)
    device = dist.current_device()
    dtype = resolve_dtype(cfg.dtype, device.type)
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(model_path, tokenizer, dtype=dtype, dropout=cfg.dropout,
                           trust_remote_code=cfg.trust_remote_code,
                           gradient_checkpointing=cfg.gradient_checkpointing)
    adapter_reference = cfg.lora_dim > 0 and cfg.only_optimize_lora and not cfg.ref_model_name_or_path
    reference = None if adapter_reference else _reference_engine(strategy, cfg, model_path, tokenizer, dtype)
    if cfg.lora_dim > 0:
        model = apply_lora(model, cfg.lora_dim, cfg.lora_module_name, cfg.lora_alpha,
                           cfg.only_optimize_lora)

    train_ds, eval_ds = create_prompt_dataset(
        cfg.data_path, cfg.data_split, cfg.data_output_path, 2, cfg.seed, tokenizer, cfg.max_seq_len,
        eos_token_id=tokenizer.eos_token_id if cfg.add_eot_token else None, num_examples=cfg.num_examples)
    if len(train_ds) == 0:
        raise ConfigError("DPO has no preference pairs: check --data_path and --data_split")
    train_loader, train_sampler, eval_loader = make_loaders(
        train_ds, eval_ds, DataCollatorReward(tokenizer.pad_token_id), cfg)
    total_steps = total_optimizer_steps(train_loader, cfg)
    engine, scheduler = strategy.prepare_trained(model, train_spec(cfg, total_steps))
    logger = run_logger(cfg)
    say = tqdm.write if dist.is_main() else (lambda *_: None)
    say(f"dpo: {len(train_ds)} train / {len(eval_ds)} eval pairs, {total_steps} optimizer steps, "
        f"{dist.world_size()} process(es), ZeRO-{cfg.zero_stage}, {cfg.dtype}, beta {cfg.beta}, "
        f"reference: {'LoRA adapters off' if adapter_reference else 'frozen copy'}")

    def answer_log_probs(module, batch):
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = answer_token_mask(batch["attention_mask"], batch["prompt_lengths"])
        return sequence_log_probs(logits, batch["input_ids"], mask)

    @torch.no_grad()
    def reference_log_probs(batch):
        if reference is not None:
            return answer_log_probs(reference, batch)
        with engine.module.disable_adapter():
            return answer_log_probs(engine, batch)

    def pair_loss(batch):
        """(loss, chosen rewards, rejected rewards) of a 2B-row batch, chosen rows first."""
        batch = to_device(batch, device)
        ref = reference_log_probs(batch)
        policy = answer_log_probs(engine, batch)
        half = policy.size(0) // 2
        return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], cfg.beta, cfg.label_smoothing)

    def loss_fn(batch):
        loss, chosen, rejected = pair_loss(batch)
        return loss, chosen.size(0), {"accuracy": (chosen > rejected).float().mean().item(),
                                      "chosen_reward": chosen.mean().item(),
                                      "rejected_reward": rejected.mean().item()}

    @torch.no_grad()
    def evaluate():
        if len(eval_ds) == 0:
            return {}
        engine.eval()
        losses, chosen_all, rejected_all = [], [], []
        for batch in eval_loader:
            loss, chosen, rejected = pair_loss(batch)
            losses.append(loss.view(1) * chosen.size(0))
            chosen_all.append(chosen)
            rejected_all.append(rejected)
        engine.train()
        chosen, rejected = dist.all_gather_cat(torch.cat(chosen_all)), dist.all_gather_cat(torch.cat(rejected_all))
        loss = dist.all_gather_cat(torch.cat(losses)).sum() / chosen.numel()
        return {"accuracy": (chosen > rejected).float().mean().item(),
                "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
                "margin": (chosen - rejected).mean().item(), "loss": loss.item()}

    step, evals = fit(strategy, engine, scheduler, cfg, "dpo", train_loader, train_sampler, total_steps,
                      loss_fn, evaluate, logger)
    finish_run(strategy, engine, tokenizer, cfg, logger, "dpo", step, evals, headline="accuracy")


def _reference_engine(strategy, cfg, model_path, tokenizer, dtype):
    """The frozen reference as a DeepSpeed inference engine (ZeRO-3 sharded when the policy is)."""
    from utils.model import load_causal_lm, require_same_tokenizer, resolve_model_path

    ref_path = resolve_model_path(cfg.ref_model_name_or_path) if cfg.ref_model_name_or_path else model_path
    if ref_path != model_path:
        require_same_tokenizer(tokenizer, ref_path, "reference model", f"the policy ({cfg.model_name_or_path})",
                               cfg.trust_remote_code)
    model = load_causal_lm(ref_path, tokenizer, dtype=dtype, dropout=0.0,
                           trust_remote_code=cfg.trust_remote_code)
    return strategy.prepare_frozen(model, zero_stage=cfg.zero_stage, offload=cfg.offload_reference_model,
                                   micro_batch=2 * cfg.per_device_train_batch_size)


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
