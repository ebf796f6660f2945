"""LoRA through peft, plus a pure merge of peft's state dict for exporting.

The merge works on a state dict alone, so a model gathered from ZeRO-3 partitions can be
exported as a plain HF checkpoint without merging (and un-merging) the live model.
"""
from __future__ import annotations

import os
import re
import warnings

from torch import nn

from utils.config import ConfigError

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


def lora_target_modules(model: nn.Module, lora_module_name: str = "") -> list[str]:
    """Linear/Conv1D layers inside the repeated blocks (attention and MLP projections).

    Being inside a numbered block (".3.") excludes the LM head and any value/score head
    generically, whatever the family calls them.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [name for name, module in model.named_modules()
             if _is_projection(module) and module is not head
             and re.search(r"(^|\.)\d+\.", name) and lora_module_name in name]
    if not names:
        raise ConfigError(f"--lora_module_name {lora_module_name!r} matches no attention or MLP "
                          "projection of this model")
    return names


def apply_lora(model: nn.Module, lora_dim: int, lora_module_name: str = "", lora_alpha: float = 0,
               only_optimize_lora: bool = False, role: str = ""):
    """Wrap `model` with LoRA adapters of rank `lora_dim`; their update B @ A is scaled by
    lora_alpha / lora_dim (alpha defaults to the rank: scale 1; DeepSpeed-Chat's 1 / rank is
    lora_alpha=1). Says so in one line on rank 0, the scale read back from the model."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D
    if lora_dim <= 0:
        raise ConfigError(f"--lora_dim must be positive to apply LoRA, got {lora_dim}")
    targets = lora_target_modules(model, lora_module_name)
    # GPT-2's Conv1D stores weights as (in, out): peft must know to transpose its delta
    conv1d = any(isinstance(model.get_submodule(t), Conv1D) for t in targets)
    config = LoraConfig(r=lora_dim, lora_alpha=lora_alpha or lora_dim, lora_dropout=0.0,
                        target_modules=targets, fan_in_fan_out=conv1d, bias="none",
                        task_type="CAUSAL_LM" if hasattr(model, "generate") else None)
    with warnings.catch_warnings():  # peft still calls transformers' deprecated alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    if not only_optimize_lora:  # peft freezes the base; full fine-tuning + LoRA trains both
        for param in peft_model.parameters():
            param.requires_grad_(True)
    if os.environ.get("RANK", "0") == "0":
        print(f"{role + ' ' if role else ''}LoRA: rank {lora_dim}, alpha {config.lora_alpha:g}, update scaled by "
              f"alpha/rank = {lora_scaling(peft_model):g}, on {len(targets)} layers", flush=True)
    return peft_model


class AdaptersOff:
    """Calls `model`, a peft LoRA model or a DeepSpeed engine around one, with its adapters
    switched off: the model it started from (DPO's reference when only the adapters train)."""

    def __init__(self, model: nn.Module):
        self.model = model
        inner = getattr(model, "module", None)  # a DeepSpeed engine's model
        self.peft_model = inner if isinstance(inner, nn.Module) else model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.model(*args, **kwargs)


class AdapterOffReference(AdaptersOff):
    """A frozen reference scorer made of a LoRA engine (Step 3's actor with only its adapters
    trained): the engine's own forward with the adapters off, so no second copy of the base is
    loaded. It answers like the frozen engine it replaces: always in eval mode and without
    gradients, whatever mode the engine is in (restored after each call, so scoring between two
    training forwards leaves the actor training; dropout would make the reference noisy);
    `eval()`/`train()` do not reach the engine. `module` is the engine's model, so code that
    unwraps the reference (packed forwards, FLOP counts) finds the shared base; its
    `parameters()` are the engine's own base tensors, not copies."""

    training = False

    @property
    def module(self) -> nn.Module:
        return self.peft_model

    def __call__(self, *args, **kwargs):
        import torch
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return super().__call__(*args, **kwargs)
        finally:
            self.model.train(was_training)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self  # frozen: a trainer switching its models to training mode leaves it in eval

    def named_parameters(self):
        return ((name, param) for name, param in self.peft_model.named_parameters() if ".lora_" not in name)

    def parameters(self):
        return (param for _, param in self.named_parameters())

    def zero_optimization_stage(self) -> int:
        return self.model.zero_optimization_stage()


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def is_lora_wrapped(model: nn.Module) -> bool:
    """Whether `model` is a peft model (LoRA adapters around a base model): the one test the
    toolkit uses wherever a wrapped model is handled differently."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if is_lora_wrapped(model) else model


def lora_scaling(model: nn.Module) -> float:
    """The factor peft multiplies B @ A by (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers")
    return float(layers[0].scaling[ADAPTER])


def lora_fan_in_fan_out(model: nn.Module) -> bool:
    """Whether the LoRA base weights are stored transposed (GPT-2 Conv1D)."""
    return bool(model.peft_config[ADAPTER].fan_in_fan_out)


def merge_lora_state_dict(state_dict: dict, scaling: float,
                          fan_in_fan_out: bool | None = None) -> dict:
    """peft state dict -> the base model's own state dict with W + scaling * B @ A merged.

    Pure: nothing is modified in place. `fan_in_fan_out` says the weights are stored as
    (in, out) (GPT-2's Conv1D), so the delta is transposed. None infers it from the shapes
    of the non-square LoRA weights; a square weight alone cannot tell, so with only square
    targets pass it explicitly (lora_fan_in_fan_out(model)).
    """
    pairs = lora_pairs(state_dict)
    if fan_in_fan_out is None and pairs:
        fan_in_fan_out = _infer_fan_in_fan_out(state_dict, pairs)
    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue  # folded into the base weight below
        if key in pairs:
            value = merged_weight(value, *pairs[key], scaling, fan_in_fan_out, key)
        merged[key.replace(".base_layer.", ".").removeprefix(PEFT_PREFIX)] = value
    return merged


def lora_pairs(state_dict: dict) -> dict:
    """base weight key -> (A, B) for every LoRA-wrapped layer."""
    pairs = {}
    for key in state_dict:
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            lora_a = state_dict.get(f"{stem}.lora_A.{ADAPTER}.weight")
            lora_b = state_dict.get(f"{stem}.lora_B.{ADAPTER}.weight")
            if lora_a is not None and lora_b is not None:
                pairs[key] = (lora_a, lora_b)
    return pairs


def _infer_fan_in_fan_out(state_dict: dict, pairs: dict) -> bool:
    votes = set()
    for key, (lora_a, lora_b) in pairs.items():
        in_dim, out_dim = lora_a.shape[1], lora_b.shape[0]
        if in_dim != out_dim:
            votes.add(tuple(state_dict[key].shape) == (in_dim, out_dim))
    if len(votes) != 1:
        raise ValueError("cannot tell from the shapes whether LoRA weights are stored "
                         "transposed; pass fan_in_fan_out=lora_fan_in_fan_out(model)")
    return votes.pop()


def merged_weight(weight, lora_a, lora_b, scaling: float, fan_in_fan_out: bool, key: str = "weight"):
    """One LoRA layer's W + scaling * B @ A, computed in fp32 and returned in W's dtype; the
    inputs are left as they were. The sum is built in the delta's own fp32 buffer (the same
    values as weight.float() + scaling * delta), so a merge needs one fp32 copy of W, not three:
    the streaming export merges the layers one by one."""
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    if fan_in_fan_out:
        delta = delta.T
    if delta.shape != weight.shape:
        raise ValueError(f"{key}: LoRA delta {tuple(delta.shape)} does not fit weight "
                         f"{tuple(weight.shape)} (wrong fan_in_fan_out={fan_in_fan_out}?)")
    return delta.mul_(scaling).add_(weight).to(weight.dtype)
