"""Exponential moving average of the actor (Step 3's `--enable_ema`).

ema <- decay * ema + (1 - decay) * actor, parameter by parameter, after every actor optimizer
step. The average is kept in fp32 whatever the training dtype: one step moves it by
(1 - decay) * (actor - ema), which in bf16 is mostly below a weight's spacing (with decay 0.992
most entries would never change). It is saved in the actor's dtype. The EMA model is a plain
HF model (LoRA, if the actor has it, is folded in: W + s * B @ A).

Under ZeRO-3 both models are partitioned the same way (same world, one partition per rank per
parameter), so each rank averages only its own partition, on the device the EMA's partition
lives on (CPU memory with --offload): nothing is gathered except the small LoRA factors.

With LoRA and --only_optimize_lora (TrainableEMA) the average is over the trainable parameters
alone, as with full fine-tuning it is over all weights: each LoRA factor A and B (and anything
else that requires grad) gets its own fp32 average, whole on every rank (they are small), and
the frozen base is not copied at all. The saved actor_ema is then the base with the averaged
factors merged, W + scaling * B_ema @ A_ema, in the training dtype (the factors cast to it, as
the actor's own are). B_ema @ A_ema is not the average of B @ A (the product of averages is
not the average of products): it is the model whose adapters are the averaged adapters, the
same thing an EMA of a full fine-tune is for its weights.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from utils.dist import rank
from utils.model.lora import ADAPTER, PEFT_PREFIX, is_lora_wrapped, lora_fan_in_fan_out, lora_scaling


def ema_placement(actor_zero_stage: int, offload: bool) -> tuple[int, bool]:
    """(ZeRO stage, parameters in CPU memory) of the EMA engine: partitioned like the actor, and
    where the actor's parameter partitions live (CPU memory under ZeRO-3 with --offload), so an
    update never mixes devices or shards."""
    return actor_zero_stage, offload and actor_zero_stage == 3


def _source_params(actor: nn.Module) -> dict[str, tuple[nn.Parameter, tuple | None]]:
    """EMA parameter name -> (actor parameter, (lora_A, lora_B) or None)."""
    params = dict(actor.named_parameters())
    out = {}
    for key, param in params.items():
        if ".lora_" in key:
            continue
        lora = None
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            pair = (params.get(f"{stem}.lora_A.{ADAPTER}.weight"), params.get(f"{stem}.lora_B.{ADAPTER}.weight"))
            lora = pair if None not in pair else None
        out[key.replace(".base_layer.", ".").removeprefix(PEFT_PREFIX)] = (param, lora)
    return out


def _whole(params, modifier_rank=None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _lora_delta(lora: tuple, scaling: float, fan_in_fan_out: bool, gathered) -> torch.Tensor:
    with gathered(lora):
        delta = scaling * (lora[1].float() @ lora[0].float())
    return delta.T if fan_in_fan_out else delta


def _partition(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a whole tensor, shaped like the local partition `part`."""
    flat = full.reshape(-1)
    start = rank() * part.numel()
    piece = flat[start:start + part.numel()]
    if piece.numel() < part.numel():  # the last partition is padded
        piece = torch.cat([piece, piece.new_zeros(part.numel() - piece.numel())])
    return piece.view_as(part)


@torch.no_grad()
def update_ema(actor: nn.Module, ema: nn.Module, decay: float, gathered=_whole) -> None:
    """Move `ema` (module of the EMA engine) towards `actor` (module of the actor engine).
    `gathered(params)`: a context in which ZeRO-3-partitioned LoRA factors are whole (the
    strategy's; the default suits models that are not partitioned)."""
    sources = _source_params(actor)
    peft = is_lora_wrapped(actor)
    scaling = lora_scaling(actor) if peft and any(lora for _, lora in sources.values()) else 0.0
    fan_in_fan_out = lora_fan_in_fan_out(actor) if peft else False
    for name, target in ema.named_parameters():
        source, lora = sources[name]
        if lora is None and not source.requires_grad:
            continue  # frozen and not LoRA-wrapped: EMA already equals it
        sharded = hasattr(target, "ds_tensor")  # ZeRO-3: this rank's partition (the actor's alike)
        goal = target.ds_tensor if sharded else target.data
        value = (source.ds_tensor if sharded else source.data).to(goal.device, torch.float32)
        if lora is not None:
            delta = _lora_delta(lora, scaling, fan_in_fan_out, gathered).to(goal.device)
            value = value + (_partition(delta, value) if sharded else delta)
        goal.lerp_(value.to(goal.dtype), 1.0 - decay)


class TrainableEMA:
    """fp32 EMA of a model's trainable parameters (see the module docstring), keyed by the
    model's parameter names. `gathered(params, modifier_rank=None)`: a context in which
    ZeRO-3-partitioned parameters are whole (DeepSpeedStrategy.gathered)."""

    def __init__(self, model: nn.Module, gathered=_whole):
        self.model, self.gathered = model, gathered
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad(), gathered(list(self.params.values())):
            self.average = {name: p.detach().float().clone() for name, p in self.params.items()}

    def numel(self) -> int:
        return sum(t.numel() for t in self.average.values())

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """average <- decay * average + (1 - decay) * parameter, in fp32."""
        with self.gathered(list(self.params.values())):
            for name, param in self.params.items():
                self.average[name].lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.average.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.average):  # e.g. a checkpoint of a full-model EMA (other flags)
            differ = sorted(set(state) ^ set(self.average))
            raise ValueError(f"the EMA checkpoint does not average this run's trainable parameters "
                             f"({len(differ)} names differ, e.g. {differ[0]})")
        for name, t in self.average.items():
            t.copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self):
        """The model's trainable parameters hold the average (cast to their dtype) inside the
        block, and exactly their own values again after it: the model, saved inside, is the EMA
        model. Under ZeRO-3 every rank sets the same whole values and they are re-partitioned."""
        params = list(self.params.values())
        with torch.no_grad():
            with self.gathered(params, modifier_rank=0):
                own = {name: p.detach().clone() for name, p in self.params.items()}
                for name, p in self.params.items():
                    p.copy_(self.average[name].to(p.device, p.dtype))
            try:
                yield self.model
            finally:
                with self.gathered(params, modifier_rank=0):
                    for name, p in self.params.items():
                        p.copy_(own[name])
