"""Step 3's data: the prompt batches of the rollouts, the ptx text batches, and how many
rounds and optimizer steps the run makes of them."""
from __future__ import annotations

import itertools
import math

from torch.utils.data import DataLoader, DistributedSampler

from training.step3_rlhf_finetuning.config import PtxConfig, Step3Config
from utils import dist
from utils.config import ConfigError
from utils.data import DataCollatorPrompt, DataCollatorSFT, create_prompt_dataset, get_unsupervised_dataset
from utils.run import loader_generator


def prompt_loader(cfg: Step3Config, tokenizer):
    """Step 3's share of the prompts, left-padded, whole generation batches only; each batch also
    holds the prompts' row "columns" and "origins" (DataCollatorPrompt)."""
    max_prompt = cfg.generation.max_prompt_seq_len
    train, _ = create_prompt_dataset(
        cfg.data_path, cfg.data_split, cfg.data_output_path, 3, cfg.seed, tokenizer,
        max_prompt, num_examples=cfg.num_examples, max_prompt_seq_len=max_prompt, chat_template=cfg.chat_template)
    cfg.data_format = train.data_format  # saved in training_config.json: chat.py talks to the actor in it
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


def unsupervised_batches(ptx: PtxConfig, cfg: Step3Config, tokenizer):
    """Endless ptx micro-batches (the text source is cycled), or None when ptx is off."""
    if not ptx.enabled:
        return None
    data = get_unsupervised_dataset(ptx.unsupervised_dataset_name, tokenizer, cfg.max_seq_len,
                                    cfg.data_output_path, cfg.seed,
                                    config_name=ptx.unsupervised_dataset_config_name or None)
    sampler = DistributedSampler(data, shuffle=True, seed=cfg.seed)
    loader = DataLoader(data, batch_size=cfg.per_device_training_batch_size, sampler=sampler,
                        collate_fn=DataCollatorSFT(tokenizer.pad_token_id), drop_last=False,
                        generator=loader_generator(cfg.seed))

    return (batch for epoch in itertools.count() for batch in _epoch(loader, sampler, epoch))


def total_iterations(cfg: Step3Config, loader) -> tuple[int, int]:
    """(rollout rounds, optimizer steps of each trained model) for the whole run."""
    rounds = len(loader) // cfg.generation_batches * cfg.num_train_epochs
    if cfg.enable_test_mode:
        rounds = min(rounds, cfg.test_stop_step)
    if cfg.max_rounds:
        rounds = min(rounds, cfg.max_rounds)
    return rounds, max(1, rounds * optimizer_steps_per_round(cfg))


def optimizer_steps_per_round(cfg: Step3Config) -> int:
    """Optimizer steps of the actor (and critic) per round: see update.accumulation_groups."""
    return math.ceil(cfg.micro_batches_per_round / cfg.gradient_accumulation_steps)


def prompt_batches(cfg: Step3Config, loader, sampler, rounds_done: int):
    """The prompt batches of the rounds still to run (a resumed run skips the finished ones)."""
    batches = ((epoch, batch) for epoch in range(cfg.num_train_epochs) for batch in _epoch(loader, sampler, epoch))
    return (batch for _, batch in itertools.islice(batches, rounds_done * cfg.generation_batches, None))


def _epoch(loader, sampler, epoch: int):
    sampler.set_epoch(epoch)
    yield from loader
