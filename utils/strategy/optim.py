"""AdamW with three parameter groups, and the learning-rate schedule."""
from __future__ import annotations

import torch
from transformers import get_scheduler

from utils.config import ConfigError
from utils.dist import on_cuda

# Norm and bias weights get no weight decay (standard AdamW practice).
NO_DECAY_KEYS = ("bias", "norm.weight", "ln_f.weight", "ln_1.weight", "ln_2.weight",
                 "layernorm.weight", "layer_norm.weight", "_ln.weight", "ln_attn", "ln_mlp")


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
    """AdamW. On CPU torch's fused AdamW (faster per step than DeepSpeedCPUAdam here: see
    docs/2026-11-23-step1-deepspeed-overhead.md);
    on CUDA with offload, DeepSpeedCPUAdam, the optimizer ZeRO-Offload is built around."""
    groups = optimizer_param_groups(model, weight_decay, lora_lr)
    if on_cuda() and offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds a CUDA-host op: only when used
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def create_adam_state(optimizer) -> int:
    """Create torch Adam/AdamW's per-parameter state (step and moments) now, as its first step
    would (same tensors, same dtypes and devices: tested), for parameters that have none yet;
    returns how many bytes that took. Any other optimizer is left lazy (returns 0).

    Why: created lazily, the moments (8 bytes a trained fp32 parameter) take the CPU pages the
    first step's activations have just freed, so the second step's activations grow the heap
    once more: ~230k page faults, 4 s, in Step 3's second round of SmolLM2-135M PPO here
    (docs/2026-12-06-optimizer-state-and-flops.md). Created before the first forward, they sit
    below the activations, whose pages the second step then reuses."""
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam
        return 0
    created = 0
    for group in optimizer.param_groups:
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        # torch's rules for `step`: fp32 when fused, else the default dtype's precision; on the
        # parameter's device when fused or capturable, else on the CPU
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not group["fused"] \
            else torch.float32
        on_param = group["fused"] or group["capturable"]
        for p in group["params"]:
            if optimizer.state[p]:  # a resumed run's, or created already
                continue
            state = optimizer.state[p]
            state["step"] = torch.zeros((), dtype=step_dtype, device=p.device if on_param else "cpu")
            for name in moments:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            created += len(moments) * p.numel() * p.element_size()
    return created


def build_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    try:
        return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=max(total_steps, 1))
    except ValueError as err:
        raise ConfigError(f"--lr_scheduler_type {name!r}: {err}") from None
