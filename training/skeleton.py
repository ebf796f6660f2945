"""The training skeleton of Steps 1, 2 and DPO.

A step supplies what is its own as a `Step`: its model, its collator and data share, its loss
and its evaluation (the losses themselves are utils/losses.py). `step.run()` (run_step) does
the rest, the same for every step: the run's set-up (utils/run.py), tokenizer, data and
loaders, the DeepSpeed engine, the fit loop (accumulation, logging, evaluation, checkpoints with
--save_steps/--resume, stop signals, skipped non-finite losses) and the final save.

A step's main.py holds its config and `main()`: it parses the flags, then imports its Step
(this module and torch with it), so that `--help` and config errors answer at once and
train.py reads the config classes without loading torch.
"""
from __future__ import annotations

import itertools
import math
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from utils import dist
from utils.allocator import keep_freed_blocks
from utils.config import ConfigError
from utils.data import DataCollatorSFT, create_prompt_dataset, to_device
from utils.model import apply_lora, load_causal_lm, load_tokenizer, resolve_model_path
from utils.run import finish_run, loader_generator, run_logger, start_run
from utils.run_checkpoints import RunCheckpoints
from utils.stopping import NonFinite, StopRequest
from utils.strategy import DeepSpeedStrategy, TrainSpec


class Step:
    """What a step supplies to the skeleton: the class attributes, build_model, loss and
    evaluate (and, where it has them, dataset_kwargs and describe). `cfg` is its parsed config."""

    name = ""                  # in messages, log lines and the progress bar, e.g. "step1"
    data_step = 1              # its share of --data_split (1: SFT texts, 2: preference pairs)
    collator = DataCollatorSFT  # a collator class, built with the tokenizer's pad id
    unit = "examples"          # what a data row is, in messages
    no_data = ""               # what the error says when the share is empty
    headline = ""              # the eval metric the closing line reports before -> after

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self, model_path: str, tokenizer, strategy: DeepSpeedStrategy):
        """The model to train (before the strategy wraps it), in the strategy's dtype; load
        anything else the loss needs here (`strategy` prepares frozen engines, e.g. DPO's reference)."""
        raise NotImplementedError

    def dataset_kwargs(self) -> dict:
        """Extra keyword arguments of create_prompt_dataset."""
        return {}

    def describe(self) -> str:
        """The end of the opening line, after the dtype (e.g. ", beta 0.1")."""
        return ""

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, int, dict]:
        """(loss, samples, extras) of a batch already on the device (see utils/losses.py)."""
        raise NotImplementedError

    def evaluate(self, engine, loader: DataLoader, device: torch.device) -> dict:
        """Metrics over the whole eval set, all ranks together; run without gradients, the
        engine in eval mode."""
        raise NotImplementedError

    def run(self) -> dict:
        """Train this step (run_step)."""
        return run_step(self)


def say(message: str) -> None:
    """Print a line on the main process without breaking the progress bar."""
    if dist.is_main():
        tqdm.write(message)


def load_trained_lm(cfg, model_path: str, tokenizer, dtype: torch.dtype):
    """The causal LM to train, in `dtype`, with the config's dropout and gradient checkpointing."""
    return load_causal_lm(model_path, tokenizer, dtype=dtype,
                          dropout=cfg.dropout, trust_remote_code=cfg.trust_remote_code,
                          gradient_checkpointing=cfg.gradient_checkpointing)


def lora_if_asked(model, cfg):
    """`model` with LoRA adapters when --lora_dim is set, else `model`."""
    if cfg.lora_dim <= 0:
        return model
    return apply_lora(model, cfg.lora_dim, cfg.lora_module_name, cfg.lora_alpha, cfg.only_optimize_lora)


def make_loaders(train_ds, eval_ds, collate, cfg):
    """(train loader, its sampler for set_epoch, eval loader), sharded over the processes."""
    sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.seed)
    train = DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, sampler=sampler,
                       collate_fn=collate, generator=loader_generator(cfg.seed))
    evaluation = DataLoader(eval_ds, batch_size=cfg.per_device_eval_batch_size,
                            sampler=DistributedSampler(eval_ds, shuffle=False), collate_fn=collate,
                            generator=loader_generator(cfg.seed))
    return train, sampler, evaluation


def total_optimizer_steps(train_loader, cfg) -> int:
    return cfg.max_steps or math.ceil(len(train_loader) / cfg.gradient_accumulation_steps) * cfg.num_train_epochs


def train_spec(cfg, total_steps: int) -> TrainSpec:
    """The one-model steps' trained engine, from their flags."""
    return TrainSpec(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, lora_lr=cfg.lora_learning_rate,
                     zero_stage=cfg.zero_stage, micro_batch=cfg.per_device_train_batch_size,
                     grad_accum=cfg.gradient_accumulation_steps, grad_clip=cfg.max_grad_norm, offload=cfg.offload,
                     scheduler=cfg.lr_scheduler_type, warmup_steps=cfg.num_warmup_steps, total_steps=total_steps)


def step_data(step: Step, tokenizer):
    """The step's (train loader, its sampler, eval loader); an empty share is refused."""
    cfg = step.cfg
    train_ds, eval_ds = create_prompt_dataset(
        cfg.data_path, cfg.data_split, cfg.data_output_path, step.data_step, cfg.seed, tokenizer, cfg.max_seq_len,
        eos_token_id=tokenizer.eos_token_id if cfg.add_eot_token else None, num_examples=cfg.num_examples,
        chat_template=cfg.chat_template, **step.dataset_kwargs())
    cfg.data_format = train_ds.data_format  # saved in training_config.json: chat.py talks to the model in it
    if len(train_ds) == 0:
        raise ConfigError(f"{step.no_data}: check --data_path and --data_split")
    return make_loaders(train_ds, eval_ds, step.collator(tokenizer.pad_token_id), cfg)


def run_step(step: Step) -> dict:
    """Train `step` from its parsed config to the saved model; returns the training summary."""
    cfg = step.cfg
    strategy = start_run(cfg)
    device = dist.current_device()
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = step.build_model(model_path, tokenizer, strategy)
    train_loader, train_sampler, eval_loader = step_data(step, tokenizer)
    total_steps = total_optimizer_steps(train_loader, cfg)
    engine, scheduler = strategy.prepare_trained(model, train_spec(cfg, total_steps))
    keep_freed_blocks()  # for the steps' tensors; the model loaded under glibc's default
    logger = run_logger(cfg)
    n_eval = len(eval_loader.dataset)
    say(f"{step.name}: {len(train_loader.dataset)} train / {n_eval} eval {step.unit}, {total_steps} optimizer "
        f"steps, {dist.world_size()} process(es), ZeRO-{cfg.zero_stage}, {cfg.dtype}{step.describe()}")
    if n_eval == 0:
        say(f"{step.name}: warning: no held-out {step.unit} in this step's share; {step.headline} is not evaluated")
    loop = FitLoop(step, strategy, (engine, scheduler), (train_loader, train_sampler, eval_loader), total_steps,
                   logger, device)
    steps, evals = loop.run()
    return finish_run(strategy, engine, tokenizer, cfg, logger, step.name, steps, evals, headline=step.headline)


class ThroughputWindow:
    """Mean loss (and any extra per-batch metrics) and samples/tokens per second since the last
    flush (this process)."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.start, self.values, self.samples, self.tokens = time.perf_counter(), {}, 0, 0

    def add(self, loss: float, samples: int, tokens: int, extras: dict | None = None) -> None:
        for key, value in {"loss": loss, **(extras or {})}.items():
            self.values.setdefault(key, []).append(float(value))
        self.samples += samples
        self.tokens += tokens

    def flush(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: sum(v) / len(v) for k, v in self.values.items()}
        out.setdefault("loss", 0.0)
        out.update(samples_per_s=self.samples / elapsed, tokens_per_s=self.tokens / elapsed)
        self._reset()
        return out


class FitLoop:
    """The training loop every step shares: epochs, accumulation, logging, evaluation (before
    training, every --eval_interval steps and after each epoch), checkpoints (--save_steps,
    --resume, SIGTERM/SIGINT) and skipping non-finite losses."""

    def __init__(self, step: Step, strategy: DeepSpeedStrategy, engine_and_scheduler: tuple, loaders: tuple,
                 total_steps: int, logger, device):
        self.step, self.cfg, self.strategy = step, step.cfg, strategy
        self.engine, self.scheduler = engine_and_scheduler
        self.train_loader, self.train_sampler, self.eval_loader = loaders
        self.total_steps, self.logger, self.device = total_steps, logger, device
        self.checkpoints = RunCheckpoints(strategy, {"model": self.engine}, self.cfg, step.name, say)
        self.nonfinite = NonFinite(self.cfg.max_nonfinite_steps, self.cfg.output_dir)
        self.state = self.window = self.progress = None

    def run(self) -> tuple[int, list[dict]]:
        """(optimizer steps taken, the evaluations in order)."""
        cfg = self.cfg
        self.state, resumed = self.checkpoints.start(self.logger)
        if not resumed:
            self.evaluate(0)
        self.window = ThroughputWindow()
        self.progress = tqdm(total=self.total_steps, initial=self.state.step, desc=self.step.name,
                             disable=cfg.disable_tqdm or not dist.is_main())
        self.engine.train()
        with StopRequest() as stop:
            for epoch in range(self.state.epoch, cfg.num_train_epochs):
                if self.state.step >= self.total_steps:
                    break
                self.epoch(epoch, stop)
                if not cfg.eval_interval or self.state.step % cfg.eval_interval:
                    self.evaluate(self.state.step)
        self.checkpoints.at_end(self.state)
        self.progress.close()
        return self.state.step, self.state.evals

    def evaluate(self, step: int) -> None:
        if len(self.eval_loader.dataset) == 0:
            return
        self.engine.eval()
        with torch.no_grad():
            result = self.step.evaluate(self.engine, self.eval_loader, self.device)
        self.engine.train()
        if result:
            self.logger.log(step, result, prefix="eval/")
            say(f"{self.step.name} eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            self.state.evals.append(result)

    def epoch(self, epoch: int, stop: StopRequest) -> None:
        """One epoch, or what is left of it after a resume, or up to the last step."""
        state = self.state
        self.train_sampler.set_epoch(epoch)
        if epoch != state.epoch:
            state.epoch, state.batches_done = epoch, 0
        accepted = 0  # micro-batches backpropagated since the last optimizer step
        for batch in itertools.islice(self.train_loader, state.batches_done, None):
            state.batches_done += 1
            # An epoch whose micro-batches --gradient_accumulation_steps does not divide ends
            # with a shorter accumulation: the loop, not DeepSpeed's own count (which would
            # run into the next epoch), says where each optimizer step falls.
            last_of_epoch = state.batches_done == len(self.train_loader)
            boundary = (accepted + 1) % self.cfg.gradient_accumulation_steps == 0 or last_of_epoch
            value = self.micro_step(batch, boundary)
            if value is None:
                continue
            accepted += 1
            if not boundary:
                continue
            accepted = 0
            self.optimizer_step_done(epoch, value, stop)
            if state.step >= self.total_steps:
                break

    def micro_step(self, batch: dict, boundary: bool) -> float | None:
        """Forward, backward and (at a boundary) the optimizer step of one micro-batch; its
        loss, or None when it was skipped as NaN/inf."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        loss, samples, extras = self.step.loss(self.engine, to_device(batch, self.device))
        value = loss.item()  # one device sync per micro-step, shared by the check and the log
        stepped = self.strategy.step_if_finite(self.engine, loss)
        if self.nonfinite.skip(value if stepped else float("nan"), self.state.step):
            self.logger.log(self.state.step, {"skipped_nonfinite": self.nonfinite.total}, prefix="train/")
            say(f"{self.step.name}: skipped a micro-batch at step {self.state.step} (loss {value} here; "
                "NaN/inf on at least one process)")
            return None
        self.window.add(value, samples, int(batch["attention_mask"].sum()), extras)
        return value

    def optimizer_step_done(self, epoch: int, value: float, stop: StopRequest) -> None:
        """After an optimizer step: count it, log, evaluate and checkpoint when due."""
        cfg, state = self.cfg, self.state
        state.step += 1
        self.progress.update(1)
        step = state.step
        if cfg.print_loss:
            say(f"epoch {epoch} step {step} loss {value:.4f}")
        if step % cfg.log_interval == 0 or step == self.total_steps:
            metrics = {**self.window.flush(), "lr": self.scheduler.get_last_lr()[0], "epoch": epoch}
            self.logger.log(step, metrics, prefix="train/")
            self.progress.set_postfix(loss=f"{metrics['loss']:.3f}")
        if cfg.eval_interval and step % cfg.eval_interval == 0:
            self.evaluate(step)
        self.checkpoints.after_step(state, stop, self.progress)
