"""Pieces of the training loop that every step shares."""
from __future__ import annotations

import itertools
import math
import shutil
import signal
import time
from dataclasses import asdict

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from utils import checkpoint, dist
from utils.config import ConfigError
from utils.fs import LOG_SUBDIR, WriteRefused, check_output_dir, refused, refused_write
from utils.metrics import MetricsLogger
from utils.strategy import DeepSpeedStrategy, TrainSpec


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100.

    `fp32` upcasts the logits first: more exact under bf16/fp16 at the cost of one
    (batch, seq, vocab) fp32 copy."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    if fp32:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate_lm(engine, dataloader, device) -> dict:
    """Token-weighted mean loss and perplexity over the whole eval set, across all ranks."""
    was_training = engine.module.training
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    for batch in dataloader:
        batch = to_device(batch, device)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n_tokens = (batch["labels"][:, 1:] != -100).sum()
        loss = causal_lm_loss(logits, batch["labels"], fp32=True)
        total += torch.stack([loss.double() * n_tokens, n_tokens.double()])
    if torch_dist.is_initialized():
        torch_dist.all_reduce(total)
    if was_training:
        engine.train()
    mean = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


# ---------------------------------------------------------------- run set-up shared by the steps

def start_run(cfg, engines: tuple[dict, ...] = ({},)) -> DeepSpeedStrategy:
    """Refuse a used output folder, join the process group, settle the dtype, check the trained
    engines' settings (`engines`: check_engine_config's flag names, one dict per engine; the
    default is the one-model steps' engine), seed everything. Returns the run's strategy."""
    # --resume continues in the folder it left, so a used folder is expected there
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir or getattr(cfg, "resume", False))
    strategy = DeepSpeedStrategy(cfg.dtype, cfg.deepspeed_config)
    strategy.setup_distributed(cfg.local_rank)
    cfg.dtype = strategy.dtype
    for flags in engines:
        check_engine_config(strategy, cfg, **flags)
    dist.set_seed(cfg.seed)
    return strategy


def check_engine_config(strategy: DeepSpeedStrategy, cfg, zero_stage_flag: str = "--zero_stage",
                        micro_batch_flag: str = "--per_device_train_batch_size") -> dict:
    """A trained engine's DeepSpeed config, built before any model or data is loaded so that a
    combination it cannot run (--offload without ZeRO, fp16 without CUDA, batch sizes in
    --deepspeed_config that disagree with the flags) is refused before any work. The flags
    name the engine's settings in `cfg` (Step 3: --actor_zero_stage, --critic_zero_stage and
    --per_device_training_batch_size); errors name them."""
    zero_stage, micro_batch = getattr(cfg, zero_stage_flag[2:]), getattr(cfg, micro_batch_flag[2:])
    if cfg.offload and zero_stage == 0:
        raise ConfigError(f"--offload needs ZeRO stage 1, 2 or 3 ({zero_stage_flag})")
    user = strategy.user_config
    config = strategy.train_config(TrainSpec(lr=0.0, weight_decay=0.0, lora_lr=0.0, zero_stage=zero_stage,
                                             micro_batch=micro_batch, grad_accum=cfg.gradient_accumulation_steps,
                                             offload=cfg.offload))
    batch_keys = {"train_micro_batch_size_per_gpu": micro_batch_flag,
                  "gradient_accumulation_steps": "--gradient_accumulation_steps"}
    for key, flag in batch_keys.items():
        if key in user and user[key] != getattr(cfg, flag[2:]):
            raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config} sets {key} {user[key]} but {flag} is "
                              f"{getattr(cfg, flag[2:])}: set batch sizes with the flags")
    expected = micro_batch * cfg.gradient_accumulation_steps * dist.world_size()
    if config["train_batch_size"] != expected:
        raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config} sets train_batch_size "
                          f"{config['train_batch_size']}, which is not {micro_batch_flag} "
                          f"{micro_batch} x --gradient_accumulation_steps "
                          f"{cfg.gradient_accumulation_steps} x {dist.world_size()} process(es) = {expected}")
    return config


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: otherwise each new iterator draws its base seed from the
    global RNG, which shifts dropout and sampling after a resume (iterators start elsewhere)."""
    return torch.Generator().manual_seed(seed)


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


def run_logger(cfg):
    return MetricsLogger(f"{cfg.output_dir}/{LOG_SUBDIR}", enabled=dist.is_main(),
                         tensorboard=cfg.enable_tensorboard, tensorboard_dir=cfg.tensorboard_path or None)


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


class StopRequest:
    """SIGTERM/SIGINT while training: remember it, so the loop can save a checkpoint at the next
    step boundary and exit cleanly instead of dying mid-update."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether any rank was asked to stop (all ranks must agree, to save together)."""
        return dist.any_rank(self.signal is not None)


class NonFinite:
    """Counts micro-batches skipped for a NaN/inf loss; too many in a row stop the run.

    With `output_dir`, the stop names the newest checkpoint there (or says there is none);
    `advice` ends it (the flags that help, in the step's names)."""

    def __init__(self, limit: int, output_dir: str | None = None,
                 advice: str = "Lower --learning_rate, use --dtype fp32 or --compute_fp32_loss"):
        self.limit, self.in_a_row, self.total = limit, 0, 0
        self.output_dir, self.advice = output_dir, advice

    def _left(self) -> str:
        if self.output_dir is None:
            return "the last checkpoint is intact"
        newest = checkpoint.latest(self.output_dir)
        return (f"the newest checkpoint, {newest}, is intact" if newest else
                "no checkpoint was saved yet")

    def skip(self, value: float, step: int) -> bool:
        if math.isfinite(value):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            raise ConfigError(f"loss was {value} for {self.in_a_row} micro-batches in a row at step {step}; "
                              f"{self._left()}. {self.advice}")
        return True


class RunCheckpoints:
    """The checkpoint side of a training loop (Steps 1, 2, DPO through fit(); Step 3's rounds):
    where to start (--resume), when to save (--save_steps, a stop signal, the end)."""

    def __init__(self, strategy: DeepSpeedStrategy, engines: dict, cfg, name: str, say):
        self.strategy, self.engines, self.cfg, self.name, self.say = strategy, engines, cfg, name, say
        self.every = getattr(cfg, "save_steps", 0)

    def start(self, logger):
        """(LoopState, resumed): the newest checkpoint's state with --resume, else a fresh one."""

        resume = getattr(self.cfg, "resume", False)
        folder = checkpoint.latest(self.cfg.output_dir) if resume else None
        if folder is None:
            if not resume:  # --overwrite_output_dir: another run's checkpoints must not be resumed into
                self._forget_previous_run()
            logger.truncate_after(-1)  # a fresh start: no earlier run's or attempt's log lines
            return checkpoint.LoopState(), False
        state = checkpoint.load(self.strategy, self.engines, folder)
        logger.truncate_after(state.step)
        self.say(f"resumed from {folder} (step {state.step}, epoch {state.epoch}, "
                 f"{state.batches_done} batches in)")
        return state, True

    def _forget_previous_run(self) -> None:
        """A fresh run in a folder that holds another run's checkpoints (--overwrite_output_dir,
        no --resume): remove them, so that a later --resume cannot continue the other run."""

        folder = checkpoint.root(self.cfg.output_dir)
        ours = sorted([*folder.glob("step-*"), *folder.glob(".tmp-step-*")]) if folder.is_dir() else []
        if dist.is_main() and ours:
            for old in ours:  # only what checkpoint.save writes: a user's own files there stay
                shutil.rmtree(old)
            self.say(f"{self.name}: removed the previous run's {len(ours)} checkpoint folder(s) from "
                     f"{folder} (--overwrite_output_dir)")
        dist.barrier()

    def save(self, state) -> None:

        try:
            folder = checkpoint.save(self.strategy, self.engines, state, self.cfg.output_dir,
                                     keep=getattr(self.cfg, "save_total_limit", 0))
        except OSError as err:
            if not refused(err):
                raise
            torn = checkpoint.root(self.cfg.output_dir) / f".tmp-step-{state.step:08d}"
            if dist.is_main():  # free what the torn attempt took; complete checkpoints are untouched
                shutil.rmtree(torn, ignore_errors=True)
            newest = checkpoint.latest(self.cfg.output_dir)
            left = (f"the newest complete checkpoint, {newest}, is intact (rerun with --resume once there "
                    "is room)" if newest else "no complete checkpoint was saved before")
            raise WriteRefused(f"{refused_write(err, f'the step {state.step} checkpoint')}; {left}") from err
        self.say(f"{self.name} checkpoint: {folder}")

    def after_step(self, state, stop: StopRequest, progress) -> None:
        """Save when --save_steps is due or a signal arrived; after a signal, exit cleanly."""
        stopping = stop.requested()
        if (self.every and state.step % self.every == 0) or stopping:
            self.save(state)
        if stopping:
            progress.close()
            self.say(f"{self.name}: stopped by signal at step {state.step}; rerun with --resume to continue")
            raise SystemExit(128 + (stop.signal or 15))

    def at_end(self, state) -> None:
        if self.every and state.step % self.every:  # unless the last step has just saved
            self.save(state)


def fit(strategy: DeepSpeedStrategy, engine, scheduler, cfg, name: str, train_loader, train_sampler, total_steps: int,
        loss_fn, evaluate, logger) -> tuple[int, list[dict]]:
    """The training loop every step shares: epochs, accumulation, logging, evaluation,
    checkpoints (--save_steps, --resume, SIGTERM/SIGINT) and skipping non-finite losses.

    `loss_fn(batch) -> (loss, samples in the batch, {extra metric: float})`, the extras averaged
    into the train/ log lines; `evaluate() -> metrics dict` (run before
    training, after each epoch, and every --eval_interval steps). Returns (optimizer steps
    taken, the evaluations in order)."""

    say = tqdm.write if dist.is_main() else (lambda *_: None)
    checkpoints = RunCheckpoints(strategy, {"model": engine}, cfg, name, say)
    state, resumed = checkpoints.start(logger)
    nonfinite = NonFinite(getattr(cfg, "max_nonfinite_steps", 0), cfg.output_dir)

    def run_eval(step: int) -> None:
        result = evaluate()
        if result:
            logger.log(step, result, prefix="eval/")
            say(f"{name} eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            state.evals.append(result)

    if not resumed:
        run_eval(0)
    window = ThroughputWindow()
    progress = tqdm(total=total_steps, initial=state.step, desc=name, disable=cfg.disable_tqdm or not dist.is_main())
    engine.train()
    with StopRequest() as stop:
        for epoch in range(state.epoch, cfg.num_train_epochs):
            if state.step >= total_steps:
                break
            train_sampler.set_epoch(epoch)
            if epoch != state.epoch:
                state.epoch, state.batches_done = epoch, 0
            accepted = 0  # micro-batches backpropagated since the last optimizer step
            for batch in itertools.islice(train_loader, state.batches_done, None):
                state.batches_done += 1
                # An epoch whose micro-batches --gradient_accumulation_steps does not divide ends
                # with a shorter accumulation: the loop, not DeepSpeed's own count (which would
                # run into the next epoch), says where each optimizer step falls.
                last_of_epoch = state.batches_done == len(train_loader)
                boundary = (accepted + 1) % cfg.gradient_accumulation_steps == 0 or last_of_epoch
                engine.set_gradient_accumulation_boundary(boundary)
                loss, samples, extras = loss_fn(batch)
                value = loss.item()  # one device sync per micro-step, shared by the check and the log
                if nonfinite.skip(value if strategy.step_if_finite(engine, loss) else float("nan"), state.step):
                    logger.log(state.step, {"skipped_nonfinite": nonfinite.total}, prefix="train/")
                    say(f"{name}: skipped a micro-batch at step {state.step} (loss {value} here; "
                        "NaN/inf on at least one process)")
                    continue
                window.add(value, samples, int(batch["attention_mask"].sum()), extras)
                accepted += 1
                if not boundary:
                    continue
                accepted = 0
                state.step += 1
                progress.update(1)
                step = state.step
                if cfg.print_loss:
                    say(f"epoch {epoch} step {step} loss {value:.4f}")
                if step % cfg.log_interval == 0 or step == total_steps:
                    metrics = {**window.flush(), "lr": scheduler.get_last_lr()[0], "epoch": epoch}
                    logger.log(step, metrics, prefix="train/")
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}")
                if cfg.eval_interval and step % cfg.eval_interval == 0:
                    run_eval(step)
                checkpoints.after_step(state, stop, progress)
                if step >= total_steps:
                    break
            if not cfg.eval_interval or state.step % cfg.eval_interval:
                run_eval(state.step)
    checkpoints.at_end(state)
    progress.close()
    return state.step, state.evals


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
        strategy.save_hf_model(engine, tokenizer, cfg.output_dir,
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
