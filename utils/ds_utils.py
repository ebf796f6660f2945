"""Everything that talks to DeepSpeed: process group, configs, optimizer, scheduler, saving.

Steps call these instead of DeepSpeed directly, so one place knows the CPU quirks (gloo
backend, torch optimizers under offload, fp16 only on CUDA) and the ZeRO-3 gather on save.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from utils.checkpoint import CHECKPOINTS
from utils.cli import free_port
from utils.config import ConfigError
from utils.fs import atomic_directory_write

# Norm and bias weights get no weight decay (standard AdamW practice).
NO_DECAY_KEYS = ("bias", "norm.weight", "ln_f.weight", "ln_1.weight", "ln_2.weight",
                 "layernorm.weight", "layer_norm.weight", "_ln.weight", "ln_attn", "ln_mlp")


# Logs of a run live inside its output folder and survive the atomic model write.
LOG_SUBDIR = "logs"


def on_cuda() -> bool:
    return torch.cuda.is_available()


def current_device() -> torch.device:
    """This process's device (after init_distributed has set the CUDA device)."""
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda() else torch.device("cpu")


def init_distributed(local_rank: int = -1) -> torch.device:
    """Start (or join) the process group and return this process's device.

    Works under the deepspeed launcher, torchrun, or plain `python` (a one-process group is
    made from defaults so DeepSpeed does not fall back to MPI discovery)."""
    import deepspeed
    import torch.distributed as dist

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, default)
    local_rank = int(os.environ["LOCAL_RANK"]) if local_rank < 0 else local_rank
    if on_cuda():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
        if device.type == "cpu":
            _unlink_shm_buffer()
    if device.type == "cpu":
        _fp32_grad_norms()
    return device


def _unlink_shm_buffer() -> None:
    """Remove the name of DeepSpeed's CPU all-reduce buffer once every rank has mapped it.

    DeepSpeed's shm_comm op creates a 66 MB /dev/shm file per process and never deletes it, so
    every CPU run leaked RAM (/dev/shm is memory): a test-suite run left ~13 GB and the next big
    job was OOM-killed. Each rank maps its peers' buffers inside init_distributed, so after a
    barrier the names can go; the mappings live on until the process exits, even a killed one."""
    import torch.distributed as dist

    dist.barrier()
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
    name.unlink(missing_ok=True)


def _fp32_grad_norms() -> None:
    """Accumulate ZeRO's gradient norms in fp32 instead of fp64 on CPU.

    DeepSpeed copies every gradient to float64 to take the clipping norm; on a CPU that is a
    full extra pass over memory each step (measured: 0.45 s of a 3.1 s SmolLM2-135M ZeRO-2
    step here). fp32 accumulation is what torch's clip_grad_norm_ does and is ample for a
    clipping threshold. On GPUs DeepSpeed's default is left alone."""
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.stage_1_and_2 as stage_1_and_2
    for module in (stage_1_and_2, stage3):
        module.get_norm_dtype = lambda: torch.float32


def shutdown_distributed() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if on_cuda():
        torch.cuda.manual_seed_all(seed)


def _precision_section(dtype: str) -> dict:
    if dtype == "fp16":
        if not on_cuda():
            raise ConfigError("--dtype fp16 needs a CUDA device; use bf16 or fp32 on this machine")
        return {"fp16": {"enabled": True, "loss_scale_window": 100, "initial_scale_power": 16}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    if dtype == "fp32":
        return {}
    raise ConfigError(f"--dtype {dtype!r} is not one of bf16, fp32, fp16")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_user_ds_config(path: str) -> dict:
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {err}") from None


def train_ds_config(*, micro_batch: int, grad_accum: int = 1, zero_stage: int = 0,
                    offload: bool = False, dtype: str = "bf16", grad_clip: float = 1.0,
                    user_config: dict | None = None) -> dict:
    """DeepSpeed config for a trained engine; `user_config` entries override ours."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero_stage {zero_stage} must be 0, 1, 2 or 3")
    if offload and zero_stage == 0:
        raise ConfigError("--offload needs ZeRO stage 1, 2 or 3 (--zero_stage)")
    device = "cpu" if offload else "none"
    zero = {
        "stage": zero_stage,
        "offload_optimizer": {"device": device},
        "overlap_comm": on_cuda(),
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if zero_stage == 3:
        zero.update({
            "offload_param": {"device": device},
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "steps_per_print": 10**9,  # we log ourselves
        "zero_optimization": zero,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        # Our optimizer is a torch one on CPU (10x faster step than DeepSpeed's here).
        "zero_force_ds_cpu_optimizer": False,
        **_precision_section(dtype),
    }
    config["train_batch_size"] = micro_batch * grad_accum * world_size()
    return _merge(config, user_config or {})


def eval_ds_config(*, micro_batch: int, zero_stage: int = 0, offload: bool = False,
                   dtype: str = "bf16") -> dict:
    """DeepSpeed config for a frozen (eval-only) engine: reference or reward model.

    Sharded (ZeRO-3) when the trained models are; `offload` keeps its parameters in CPU memory,
    which only ZeRO-3 can do, so it implies stage 3."""
    zero = {"stage": 3 if zero_stage == 3 or offload else 0,
            "stage3_param_persistence_threshold": 1e4,
            "offload_param": {"device": "cpu" if offload else "none"}}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size(),
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        **_precision_section(dtype),
    }
    return config


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every process: decisions that lead to collectives (skip an
    update, save a checkpoint) must be the same everywhere."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=current_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool) -> bool:
    return not all_ranks(not flag)


def all_gather_cat(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's first dimension across processes (equal shapes: samplers pad)."""
    if world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size())]
    torch.distributed.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float, lora_lr: float) -> list[dict]:
    """Three groups: decayed weights, undecayed biases/norms, LoRA matrices at their own lr."""
    decay, no_decay, lora = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name:
            lora.append(param)
        elif any(key in name.lower() for key in NO_DECAY_KEYS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": lora, "weight_decay": 0.0, "lr": lora_lr}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, lora_lr: float,
                    offload: bool, betas=(0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW. On CPU torch's fused AdamW (DeepSpeedCPUAdam is ~10x slower per step here);
    on CUDA with offload, DeepSpeedCPUAdam, the optimizer ZeRO-Offload is built around."""
    groups = optimizer_param_groups(model, weight_decay, lora_lr)
    if on_cuda() and offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def build_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler
    try:
        return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=max(total_steps, 1))
    except ValueError as err:
        raise ConfigError(f"--lr_scheduler_type {name!r}: {err}") from None


def initialize_trained(model: torch.nn.Module, *, lr: float, weight_decay: float, lora_lr: float,
                       zero_stage: int, offload: bool, dtype: str, micro_batch: int, grad_accum: int,
                       grad_clip: float, scheduler: str, warmup_steps: int, total_steps: int,
                       user_config: dict | None = None):
    """A trained DeepSpeed engine with our optimizer and LR schedule: (engine, scheduler)."""
    import deepspeed

    optimizer = build_optimizer(model, lr, weight_decay, lora_lr, offload)
    lr_scheduler = build_scheduler(optimizer, scheduler, warmup_steps, total_steps)
    config = train_ds_config(micro_batch=micro_batch, grad_accum=grad_accum, zero_stage=zero_stage,
                             offload=offload, dtype=dtype, grad_clip=grad_clip, user_config=user_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      config=config)
    return engine, lr_scheduler


def initialize_frozen(model: torch.nn.Module, *, zero_stage: int, offload: bool, dtype: str,
                      micro_batch: int):
    """An eval-only DeepSpeed engine (reference, reward, EMA): no optimizer, eval mode."""
    import deepspeed

    model.requires_grad_(False)
    config = eval_ds_config(micro_batch=micro_batch, zero_stage=zero_stage, offload=offload, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def gathered_state_dict(engine) -> dict | None:
    """The full state dict of a DeepSpeed engine's module, on rank 0 (None elsewhere), each tensor
    a CPU copy of its own (safetensors refuses views and shared storage; tied weights appear
    under each of their names).

    ZeRO-3 shards every parameter, so all ranks must take part in the gather."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathered copies, but see own_storage
        if not is_main():
            return None
        out, seen = {}, set()
        for key, value in state.items():  # tied weights (embeddings and LM head) come back as one tensor
            value = own_storage(value)
            out[key] = value.clone() if value.data_ptr() in seen else value
            seen.add(value.data_ptr())
        return out
    if not is_main():
        return None
    # a copy: the live parameters keep training (and are views of ZeRO's flat buffers)
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns all of its storage, copying only when needed.

    ZeRO keeps parameters as views of flat buffers (stage 0-2, and under stage 3 the parameters
    below its persistence threshold, which stay whole on every rank), and safetensors refuses
    to save a view that does not cover its whole storage."""
    tensor = tensor.detach().cpu()
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() and tensor.storage_offset() == 0 else tensor.clone()


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds a model, unless asked to."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {output_dir} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {output_dir} already holds files; pass "
                          "--overwrite_output_dir to replace them or choose another folder")


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def hf_state_dict(engine, dtype: torch.dtype | None = None):
    """(the HF model, its plain state dict) of an engine, on rank 0 (None elsewhere; under
    ZeRO-3 every rank must call this): gathered, the reward model's wrapper dropped, LoRA
    merged into the base weights, floating-point weights cast to `dtype` when given."""
    state = gathered_state_dict(engine)
    if not is_main():
        return None
    module = engine.module
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if hasattr(module, "hf_model"):  # a wrapper (RewardModel): the HF model inside it
        module = module.hf_model
        state = {k[len("hf_model."):]: v for k, v in state.items() if k.startswith("hf_model.")}
    if _is_peft(module):
        from utils.model import lora_fan_in_fan_out, lora_scaling, merge_lora_state_dict
        state = merge_lora_state_dict(state, lora_scaling(module), lora_fan_in_fan_out(module))
        module = module.get_base_model()
    return module, state


def save_hf_model(engine, tokenizer, output_dir: str | Path, extra_json: dict | None = None,
                  dtype: torch.dtype | None = None) -> None:
    """Save an engine's model as a plain Hugging Face directory (safetensors + tokenizer).

    ZeRO-3 shards are gathered (every rank must call this); LoRA is merged into the base
    weights on a copy of the state dict, so the live training model is left as it was.
    `dtype` casts the floating-point weights (the fp32 EMA is saved in the training dtype).
    Written atomically: a crash while saving leaves `output_dir` as it was before."""
    from huggingface_hub import save_torch_state_dict

    exported = hf_state_dict(engine, dtype)
    if is_main():
        module, state = exported
        config = module.config
        config.architectures = [type(module).__name__]
        if dtype is not None:
            config.dtype = dtype
        tied = _tied_keys(module) if getattr(config, "tie_word_embeddings", False) else []

        def write(tmp: Path) -> None:
            save_torch_state_dict({k: v.contiguous() for k, v in state.items() if k not in tied}, tmp)
            config.save_pretrained(tmp)
            _drop_config_entry(tmp / "config.json", "quantization_config")
            if getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if extra_json:
                for name, payload in extra_json.items():
                    (tmp / name).write_text(json.dumps(payload, indent=2, default=str))

        atomic_directory_write(output_dir, write, keep=(LOG_SUBDIR, CHECKPOINTS))
    barrier()


def _drop_config_entry(path: Path, key: str) -> None:
    """A converted GGUF config keeps quantization_config; a saved copy must not."""
    data = json.loads(path.read_text())
    if data.pop(key, None) is not None:
        path.write_text(json.dumps(data, indent=2))


def _tied_keys(model) -> list[str]:
    """Names of weights that are tied to another (e.g. lm_head.weight to the embeddings)."""
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)
