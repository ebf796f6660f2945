"""Tensor-parallel inference copy: DeepSpeed AutoTP over groups of N consecutive ranks.

AutoTP shards a full HF model in place (column-parallel q/k/v/up/gate, row-parallel o/down
with an all-reduce, row-parallel lm_head). The trained weights change every PPO iteration, so
the shards are refreshed in place: each full weight (gathered a chunk of layers at a time) is
cut by the owning AutoTP layer's own `_tp_partition` (the same split that made the shard,
fused QKV and uneven head counts included) and copied over the old shard. Re-sharding instead
means building a whole new full copy and running init_inference on it again every iteration.
Slicing was measured faster (docs/2026-11-23-hybrid-engine.md), so it is kept; re-sharding is
only the fallback for a shard we cannot recompute.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from utils.config import ConfigError

# Families AutoTP cannot split here (measured on this CPU with DeepSpeed 0.19.8).
REFUSED_FAMILIES = {
    "gpt2": "AutoTP refuses GPT-2's Conv1D blocks ('AutoTP not supported ... kernel injection')",
    "bloom": "AutoTP's ALiBi slicing breaks BLOOM (alibi shape error)",
}


def check_tp_config(config, tp_size: int, world_size: int) -> None:
    """ConfigError for a TP size this model or this number of processes cannot run."""
    if tp_size < 1:
        raise ConfigError(f"--inference_tp_size must be at least 1, got {tp_size}")
    if tp_size == 1:
        return
    family = getattr(config, "model_type", "?")
    if family in REFUSED_FAMILIES:
        raise ConfigError(f"--inference_tp_size {tp_size}: tensor parallelism does not support "
                          f"the {family} family ({REFUSED_FAMILIES[family]}); use "
                          "--inference_tp_size 1")
    if family == "codegen" and config.n_head % (4 * tp_size):
        raise ConfigError(f"--inference_tp_size {tp_size}: codegen splits its fused QKV into 4 "
                          f"groups, so its {config.n_head} heads must be divisible by "
                          f"4 * {tp_size}; use --inference_tp_size 1")
    if world_size % tp_size:
        raise ConfigError(f"--inference_tp_size {tp_size} must divide the number of processes "
                          f"({world_size}): each group of {tp_size} ranks shares one model")


class TPGroups:
    """Groups of `size` consecutive ranks, handed to DeepSpeed as its `mpu`.

    DeepSpeed 0.19.8's InferenceEngine, given only `tensor_parallel.tp_group`, still builds
    the group of ranks 0..N-1 itself, wrong on every other group once world > N; an mpu
    object is the way to give it our own group. Every rank must construct this (new_group is
    collective)."""

    def __init__(self, size: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.size = size
        for start in range(0, world, size):
            ranks = list(range(start, start + size))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.group, self.ranks = group, ranks
        self.index = self.ranks.index(rank)

    # the mpu interface DeepSpeed's inference engine reads
    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self) -> int:
        return self.index

    def get_model_parallel_world_size(self) -> int:
        return self.size


def shard(model: nn.Module, groups: TPGroups, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Shard `model` in place with AutoTP; returns the sharded module.

    All ranks must call this together: init_inference broadcasts rank 0's RNG state to the
    whole world, which would also overwrite the training RNG, so the caller's state is kept."""
    import deepspeed
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # mpu: the engine's group; tp_group: the group AutoTP's layers shard over and
        # all-reduce in (with mpu alone they get None and silently keep whole weights)
        tp = {"tp_size": groups.size, "mpu": groups, "tp_group": groups.group}
        engine = deepspeed.init_inference(model, tensor_parallel=tp, dtype=dtype,
                                          replace_with_kernel_inject=False)
    return engine.module


class ShardRefresher:
    """Copies full weights into an AutoTP-sharded model's existing shards.

    `aliases` maps each full-model parameter name to every name it goes by in the sharded
    model (AutoTP unties a tied lm_head, so one full weight may feed two shards)."""

    def __init__(self, sharded: nn.Module, aliases: dict[str, list[str]], full_shapes: dict[str, tuple]):
        from deepspeed.module_inject.layers import TensorParallel_Layer
        self.model = sharded
        self.aliases = aliases
        params = dict(sharded.named_parameters(remove_duplicate=False))
        self.targets = {}  # sharded name -> (owner module, attribute, is a TP layer)
        for full_name, names in aliases.items():
            for name in names:
                if name not in params:
                    raise NotSliceable(f"{name} is gone from the sharded model")
                owner_name, _, attr = name.rpartition(".")
                owner = sharded.get_submodule(owner_name)
                is_tp = isinstance(owner, TensorParallel_Layer)
                if not is_tp and tuple(params[name].shape) != tuple(full_shapes[full_name]):
                    raise NotSliceable(f"{name}: sharded as {tuple(params[name].shape)} outside an "
                                       "AutoTP layer")
                self.targets[name] = (owner, attr, is_tp)

    @torch.no_grad()
    def refresh(self, full: dict[str, torch.Tensor]) -> int:
        """Copy the weights in `full` (full-model names) into their shards; returns how many
        shard tensors were written."""
        by_owner: dict[int, dict] = {}
        written = 0
        for full_name, tensor in full.items():
            for name in self.aliases[full_name]:
                owner, attr, is_tp = self.targets[name]
                if is_tp:
                    by_owner.setdefault(id(owner), {"owner": owner})[attr] = tensor
                else:
                    getattr(owner, attr).copy_(tensor)
                    written += 1
        for entry in by_owner.values():
            written += self._refresh_tp_layer(entry.pop("owner"), entry)
        return written

    @staticmethod
    def _refresh_tp_layer(owner: nn.Module, full: dict[str, torch.Tensor]) -> int:
        """Cut full weight/bias with the layer's own split and copy into its shards."""
        if "weight" not in full or (getattr(owner, "bias", None) is not None and "bias" not in full):
            raise RuntimeError(f"{type(owner).__name__}: weight and bias must be refreshed together")
        cut = [nn.Parameter(full["weight"].detach(), requires_grad=False),
               nn.Parameter(full["bias"].detach(), requires_grad=False) if "bias" in full else None]
        owner._tp_partition(cut)  # sets .data of each to this rank's slice (a fresh tensor)
        for attr, value in zip(("weight", "bias"), cut):
            if value is None:
                continue
            target = getattr(owner, attr)
            if target.shape != value.shape:
                raise RuntimeError(f"{type(owner).__name__}.{attr}: slice {tuple(value.shape)} does "
                                   f"not fit shard {tuple(target.shape)}")
            # a cut slice is a fresh tensor: take it; an uncut one (a row-parallel bias) or a
            # view still shares the source's storage, which ZeRO-3 frees after the gather: copy
            shared = value.data.untyped_storage().data_ptr() == full[attr].untyped_storage().data_ptr()
            target.data = value.data.clone() if shared else value.data
        return len(full)


class NotSliceable(Exception):
    """The sharded model has a parameter whose slice we cannot recompute: re-shard instead."""


def gather_group_prompts(prompt: torch.Tensor, mask: torch.Tensor, groups: TPGroups, pad_token_id: int):
    """All ranks of the TP group must run the same forward: stack the group's prompts.

    Prompts are left-padded to the group's longest and batches to its largest (filler rows:
    pads with mask 1, so no row is fully masked). Returns (ids, mask, own rows slice, width
    added on the left)."""
    sizes = torch.tensor([prompt.shape[0], prompt.shape[1]], device=prompt.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(groups.size)]
    dist.all_gather(all_sizes, sizes, group=groups.group)
    max_b = max(int(s[0]) for s in all_sizes)
    max_p = max(int(s[1]) for s in all_sizes)
    extra = max_p - prompt.shape[1]
    ids = prompt.new_full((max_b, max_p), pad_token_id)
    full_mask = mask.new_ones((max_b, max_p))
    ids[:prompt.shape[0], extra:] = prompt
    full_mask[:prompt.shape[0], :extra] = 0
    full_mask[:prompt.shape[0], extra:] = mask
    parts_ids = [torch.empty_like(ids) for _ in range(groups.size)]
    parts_mask = [torch.empty_like(full_mask) for _ in range(groups.size)]
    dist.all_gather(parts_ids, ids, group=groups.group)
    dist.all_gather(parts_mask, full_mask, group=groups.group)
    start = groups.index * max_b
    own = slice(start, start + prompt.shape[0])
    return torch.cat(parts_ids), torch.cat(parts_mask), own, extra


def broadcast_seed(seed: int, groups: TPGroups, device: torch.device) -> int:
    """The seed of the group's first rank, on every rank of the group."""
    value = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(value, src=groups.ranks[0], group=groups.group)
    return int(value.item())
