"""DeepSpeedStrategy: the one object that talks to DeepSpeed.

Every step builds one and asks it for engines (trained: optimizer, LR schedule, ZeRO stage;
frozen: reference, reward model, EMA), for the backward + step of a micro-batch, for gathered
weights, Hugging Face exports, engine checkpoints and the EMA update. It knows the CPU quirks
(gloo, torch optimizers under offload, fp16 only on CUDA) and the ZeRO-3 gathers, so nothing
else imports deepspeed (except the tensor-parallel split, inference/tensor_parallel.py).
Rank and world facts are plain torch.distributed: utils/dist.py.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.runtime.zero import stage3, stage_1_and_2
from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit
from safetensors.torch import load_file, save_file

from utils import ema
from utils.allocator import release_freed_memory
from utils.cli import free_port
from utils.config import ConfigError
from utils.dist import all_ranks, barrier, is_main, on_cuda, rank, world_size
from utils.model import resolve_dtype, resolve_dtype_name
from utils.strategy.ds_config import eval_ds_config, load_user_ds_config, train_ds_config
from utils.strategy.export import gathered, hf_state_dict, save_hf_model, save_state_file
from utils.strategy.optim import build_optimizer, build_scheduler, create_adam_state


@dataclass(frozen=True)
class TrainSpec:
    """How one trained engine is built: optimizer, schedule, batch and ZeRO settings."""
    lr: float
    weight_decay: float
    lora_lr: float
    zero_stage: int
    micro_batch: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    offload: bool = False
    scheduler: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1


class DeepSpeedStrategy:
    """`dtype`: bf16, fp32, fp16 or auto (settled by setup_distributed, once the device is
    known); `deepspeed_config`: a user JSON whose entries override the trained engines' config."""

    def __init__(self, dtype: str = "auto", deepspeed_config: str = ""):
        self.dtype = dtype
        self.user_config = load_user_ds_config(deepspeed_config)

    # ------------------------------------------------------------ process group

    def setup_distributed(self, local_rank: int = -1) -> torch.device:
        """Start (or join) the process group, settle the dtype; returns this process's device.

        Works under the deepspeed launcher, torchrun, or plain `python` (a one-process group is
        made from defaults so DeepSpeed does not fall back to MPI discovery)."""
        for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                             ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, default)
        local_rank = int(os.environ["LOCAL_RANK"]) if local_rank < 0 else local_rank
        device = torch.device("cuda", local_rank) if on_cuda() else torch.device("cpu")
        if on_cuda():
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if on_cuda() else "gloo")
            if device.type == "cpu":
                _unlink_shm_buffer()
        if device.type == "cpu":
            _fp32_grad_norms()
        self.dtype = resolve_dtype_name(self.dtype, device.type)
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, "cuda" if on_cuda() else "cpu")

    @staticmethod
    def shutdown() -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------ engines

    def train_config(self, spec: TrainSpec) -> dict:
        return train_ds_config(micro_batch=spec.micro_batch, grad_accum=spec.grad_accum,
                               zero_stage=spec.zero_stage, offload=spec.offload, dtype=self.dtype,
                               grad_clip=spec.grad_clip, user_config=self.user_config)

    def prepare_trained(self, model: torch.nn.Module, spec: TrainSpec):
        """A trained DeepSpeed engine with our optimizer and LR schedule: (engine, scheduler)."""
        optimizer = build_optimizer(model, spec.lr, spec.weight_decay, spec.lora_lr, spec.offload)
        scheduler = build_scheduler(optimizer, spec.scheduler, spec.warmup_steps, spec.total_steps)
        config = self.train_config(spec)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        release_freed_memory()
        if engine.zero_optimization_stage() == 0 and world_size() == 1:
            # stage 0 "all-reduces" over one process by flattening every gradient into a
            # bucket and copying it back: a model-sized copy each step that changes nothing
            engine.enable_backward_allreduce = False
        if config["zero_optimization"]["stage"] != spec.zero_stage and is_main():
            print(f"ZeRO stage {spec.zero_stage} over one process partitions nothing: running it as stage "
                  f"{config['zero_optimization']['stage']} (same optimizer and math, none of ZeRO's gradient "
                  "bookkeeping)", flush=True)
        return engine, scheduler

    @staticmethod
    def create_optimizer_state(engine) -> None:
        """A fresh run's optimizer state before its first forward (create_adam_state says why).
        DeepSpeed keeps the optimizer we built as basic_optimizer; under ZeRO 1-2 its groups hold
        the fp32 partitions. ZeRO-3 hands it each sub-group only during a step: left lazy."""
        create_adam_state(getattr(engine, "basic_optimizer", None))

    def prepare_frozen(self, model: torch.nn.Module, *, zero_stage: int, offload: bool, micro_batch: int,
                       dtype: str | None = None):
        """An eval-only DeepSpeed engine (reference, reward model, EMA): no optimizer, eval mode,
        in `dtype` (default the run's)."""
        model.requires_grad_(False)
        config = eval_ds_config(micro_batch=micro_batch, zero_stage=zero_stage, offload=offload,
                                dtype=dtype or self.dtype)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        release_freed_memory()
        return engine

    # ------------------------------------------------------------ updates

    @staticmethod
    def step_if_finite(engine, loss: torch.Tensor) -> bool:
        """backward + step, skipped (False) when the loss is NaN/inf on any rank (the update is
        a collective: every rank must skip alike). The engine counts its own accumulation."""
        if not all_ranks(bool(torch.isfinite(loss.detach()).all())):
            return False
        engine.backward(loss)
        engine.step()
        return True

    @staticmethod
    def backward_and_step(engine, loss: torch.Tensor, graph_output: torch.Tensor, boundary: bool = True) -> bool:
        """backward + step in a loop that sets the accumulation boundaries itself (Step 3).
        Returns whether the loss was finite on every rank.

        A NaN/inf loss is not backpropagated; a zero built from `graph_output` (a finite tensor of
        the same forward, e.g. the log-probs) is, so every micro-batch still makes exactly one
        backward and one step: a gradient accumulation always ends where the loop says and the LR
        schedule stays on its count. Every rank skips alike (the finiteness is agreed on)."""
        finite = all_ranks(bool(torch.isfinite(loss.detach()).all()))
        if not finite:
            loss = graph_output.nan_to_num(0.0, 0.0, 0.0).float().sum() * 0.0
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(loss)
        engine.step()
        return finite

    def update_ema(self, actor, ema_engine, decay: float) -> None:
        """Move the EMA engine's weights towards the actor engine's (utils/ema.py); a
        TrainableEMA (LoRA with --only_optimize_lora) holds the actor's trainable parameters' own."""
        if isinstance(ema_engine, ema.TrainableEMA):
            ema_engine.update(decay)
            return
        ema.update_ema(actor.module, ema_engine.module, decay, gathered=self.gathered)

    # ------------------------------------------------------------ weights

    # a context in which ZeRO-3-partitioned params are whole on every rank (a no-op otherwise)
    gathered = staticmethod(gathered)
    hf_state_dict = staticmethod(hf_state_dict)
    save_hf_model = staticmethod(save_hf_model)

    def save_engine(self, engine, folder: Path, tag: str) -> None:
        """An engine's part of a checkpoint (every rank calls this): DeepSpeed's own files for
        a trained engine (model, optimizer, scheduler, sharded as trained); a frozen engine
        (the EMA) has no checkpoint engine, its weights are all there is: one safetensors file."""
        if _has_checkpointing(engine):
            engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
            return
        if isinstance(engine, ema.TrainableEMA):  # whole fp32 averages, the same on every rank
            if is_main():
                save_file(engine.state_dict(), str(folder / f"{tag}.safetensors"))
            return
        save_state_file(engine, folder / f"{tag}.safetensors")  # a collective under ZeRO-3, streamed

    def load_engine(self, engine, folder: Path, tag: str) -> None:
        """Restore what save_engine wrote."""
        if _has_checkpointing(engine):
            _check_saved_stage(engine, folder / tag)
            path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise ConfigError(f"checkpoint {folder} has no state for {tag}")
            return
        path = folder / f"{tag}.safetensors"
        if not path.is_file():
            raise ConfigError(f"checkpoint file {path} is missing")
        state = load_file(str(path))
        if isinstance(engine, ema.TrainableEMA):
            try:
                engine.load_state_dict(state)
            except ValueError as err:
                raise ConfigError(f"checkpoint {path}: {err}") from None
            return
        with torch.no_grad():
            for name, param in engine.module.named_parameters():
                with self.gathered([param], modifier_rank=0):  # ZeRO-3: set on rank 0, re-shard
                    if is_main() or not hasattr(param, "ds_id"):
                        param.copy_(state[name])

    # ------------------------------------------------------------ inference

    @staticmethod
    @contextlib.contextmanager
    def torch_linear():
        """Undo ZeRO-3's process-wide F.linear replacement for the duration of the block.

        ZeRO-3 swaps torch.nn.functional.linear for `zero3_linear_wrap` (an autograd Function,
        "memory_efficient_linear", on by default) in the whole process, so every nn.Linear of any
        model pays for it, inference copies included (docs/2026-11-23-hybrid-engine.md). The
        wrapper is put back afterwards: the trained engine relies on it."""
        original, current = getattr(ZeroInit, "linear_bk", None), F.linear
        if original is None or current is original:
            yield
            return
        F.linear = original
        try:
            yield
        finally:
            F.linear = current


def _has_checkpointing(engine) -> bool:
    return getattr(engine, "checkpoint_engine", None) is not None


def _check_saved_stage(engine, folder: Path) -> None:
    """Refuse to resume a checkpoint whose optimizer state is laid out for another ZeRO mode.

    ZeRO 1-3 write the optimizer state in zero_pp_rank_* files, stage 0 inside the model
    states; DeepSpeed would fail on the other layout with a traceback. The case users meet:
    a checkpoint written on one process by a version that ran ZeRO 1-2 there, resumed now that
    one process runs stage 0 (ds_config.effective_zero_stage)."""
    if not folder.is_dir():
        return  # load_checkpoint says what is missing
    sharded = any(folder.glob("*optim_states.pt"))  # [bf16_]zero_pp_rank_N_mp_rank_00_optim_states.pt
    stage = engine.zero_optimization_stage()
    if sharded == (stage > 0):
        return
    if sharded:
        raise ConfigError(f"checkpoint {folder} holds ZeRO-sharded optimizer state, and this run's engine runs "
                          "without ZeRO (stage 0: one process at --zero_stage 1 or 2 runs as stage 0); resume "
                          "with the stage it was saved at, e.g. --deepspeed_config '{\"zero_optimization\": "
                          "{\"stage\": 2}}'")
    raise ConfigError(f"checkpoint {folder} was saved without ZeRO (stage 0), and this run's engine runs ZeRO "
                      f"stage {stage}: resume with the process count and --zero_stage it was saved with")


def _unlink_shm_buffer() -> None:
    """Remove the name of DeepSpeed's CPU all-reduce buffer once every rank has mapped it.

    DeepSpeed's shm_comm op creates a /dev/shm file per process and never deletes it, so every
    CPU run leaked RAM (/dev/shm is memory; docs/2026-11-23-step1-deepspeed-overhead.md). Each
    rank maps its peers' buffers inside init_distributed, so after a barrier the names can go;
    the mappings live on until the process exits, even a killed one."""
    barrier()
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{rank()}")
    name.unlink(missing_ok=True)


def _fp32_grad_norms() -> None:
    """Accumulate ZeRO's gradient norms in fp32 instead of fp64 on CPU.

    DeepSpeed copies every gradient to float64 to take the clipping norm; on a CPU that is a
    full extra pass over memory each step (docs/2026-11-23-step1-deepspeed-overhead.md). fp32
    accumulation is what torch's clip_grad_norm_ does and is ample for a clipping threshold. On
    GPUs DeepSpeed's default is left alone."""
    for module in (stage_1_and_2, stage3):
        module.get_norm_dtype = lambda: torch.float32
