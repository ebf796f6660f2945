"""The DeepSpeed config dicts of trained and frozen engines, and the user's overrides."""
from __future__ import annotations

import json
from pathlib import Path

from utils.config import ConfigError
from utils.dist import on_cuda, world_size


def precision_section(dtype: str) -> dict:
    if dtype == "fp16":
        if not on_cuda():
            raise ConfigError("--dtype fp16 needs a CUDA device; use bf16 or fp32 on this machine")
        return {"fp16": {"enabled": True, "loss_scale_window": 100, "initial_scale_power": 16}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    if dtype == "fp32":
        return {}
    raise ConfigError(f"--dtype {dtype!r} is not one of bf16, fp32, fp16")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
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


def effective_zero_stage(zero_stage: int, offload: bool, processes: int) -> int:
    """The ZeRO stage a trained engine runs at. Stages 1 and 2 over one process partition
    nothing: the optimizer, gradients and math are stage 0's, plus ZeRO's per-step bucket,
    flatten and copy bookkeeping (~20% of a 135M PPO update on this CPU,
    docs/2026-12-05-less-work-per-sample.md). So one process runs them as stage 0, unless
    --offload needs ZeRO to place the optimizer. Stage 3 stays (its hybrid-engine path and
    parameter placement differ)."""
    return 0 if processes == 1 and zero_stage in (1, 2) and not offload else zero_stage


def train_ds_config(*, micro_batch: int, grad_accum: int = 1, zero_stage: int = 0,
                    offload: bool = False, dtype: str = "bf16", grad_clip: float = 1.0,
                    user_config: dict | None = None) -> dict:
    """DeepSpeed config for a trained engine; `user_config` entries override ours (a stage
    given there is kept as given, see effective_zero_stage)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero_stage {zero_stage} must be 0, 1, 2 or 3")
    if offload and zero_stage == 0:
        raise ConfigError("--offload needs ZeRO stage 1, 2 or 3 (--zero_stage)")
    device = "cpu" if offload else "none"
    zero = {
        "stage": effective_zero_stage(zero_stage, offload, world_size()),
        "offload_optimizer": {"device": device},
        "overlap_comm": on_cuda(),
        "contiguous_gradients": True,
        # ZeRO's gradient bucket is allocated whole and written up to a model's worth of
        # gradients (4 bytes a parameter in fp32 under ZeRO-3); on CPU, memory is what runs out
        # first and gloo does not need big buckets, so a 200 MB bucket there
        "reduce_bucket_size": 5e8 if on_cuda() else 5e7,
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
        **precision_section(dtype),
    }
    config["train_batch_size"] = micro_batch * grad_accum * world_size()
    return merge(config, user_config or {})


def eval_ds_config(*, micro_batch: int, zero_stage: int = 0, offload: bool = False,
                   dtype: str = "bf16") -> dict:
    """DeepSpeed config for a frozen (eval-only) engine: reference, reward model or EMA.

    Sharded (ZeRO-3) when the trained models are; `offload` keeps its parameters in CPU memory,
    which only ZeRO-3 can do, so it implies stage 3."""
    zero = {"stage": 3 if zero_stage == 3 or offload else 0,
            "stage3_param_persistence_threshold": 1e4,
            "offload_param": {"device": "cpu" if offload else "none"}}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size(),
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        **precision_section(dtype),
    }
