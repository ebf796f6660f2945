"""An engine's weights as a plain Hugging Face model: gathered from ZeRO shards, the reward
model's wrapper dropped, LoRA merged, written atomically as safetensors.

The export streams: each tensor is gathered (ZeRO-3), cast, LoRA-merged, written and dropped
before the next, so saving needs memory for one tensor beyond training's, not for copies of
the whole model (a 1.7B actor was killed by the OOM killer in its final save when the export
built the state dict, a cast copy and a merged copy at once). hf_state_dict and
gathered_state_dict still build the whole dict in memory, for callers that want one."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from utils.dist import barrier, is_main
from utils.fs import CHECKPOINTS, LOG_SUBDIR, atomic_directory_write
from utils.model.lora import (PEFT_PREFIX, is_lora_wrapped, lora_pairs, lora_fan_in_fan_out, lora_scaling,
                              merge_lora_state_dict, merged_weight)
from utils.safetensors_stream import Spec, in_file_order, write_file, write_model


def gathered_state_dict(engine) -> dict | None:
    """The full state dict of a DeepSpeed engine's module, on rank 0 (None elsewhere), each tensor
    a CPU copy of its own (safetensors refuses views and shared storage; tied weights appear
    under each of their names).

    ZeRO-3 shards every parameter, so all ranks must take part in the gather. Holds a copy of
    the whole model: for small models and tests (saving streams instead: save_hf_model)."""
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


def hf_state_dict(engine, dtype: torch.dtype | None = None):
    """(the HF model, its plain state dict) of an engine, on rank 0 (None elsewhere; under
    ZeRO-3 every rank must call this): gathered, the reward model's wrapper dropped, LoRA
    merged into the base weights, floating-point weights cast to `dtype` when given. Tied
    weights appear under each name. Holds copies of the whole model (see gathered_state_dict);
    save_hf_model writes the same tensors one at a time."""
    state = gathered_state_dict(engine)
    if not is_main():
        return None
    module = engine.module
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if hasattr(module, "hf_model"):  # a wrapper (RewardModel): the HF model inside it
        module = module.hf_model
        state = {k[len("hf_model."):]: v for k, v in state.items() if k.startswith("hf_model.")}
    if is_lora_wrapped(module):
        state = merge_lora_state_dict(state, lora_scaling(module), lora_fan_in_fan_out(module))
        module = module.get_base_model()
    return module, state


def save_hf_model(engine, tokenizer, output_dir: str | Path, extra_json: dict | None = None,
                  dtype: torch.dtype | None = None, keep: tuple[str, ...] = ()) -> None:
    """Save an engine's model as a plain Hugging Face directory (safetensors + tokenizer).

    ZeRO-3 shards are gathered one parameter at a time (every rank must call this); LoRA is
    merged into each base weight as it is written, so the live training model is left as it was.
    `dtype` casts the floating-point weights (the fp32 EMA is saved in the training dtype).
    Written atomically: a crash while saving leaves `output_dir` as it was before. The run's
    logs and checkpoints in it survive the replacement, and so do the entries named in `keep`."""
    _streamed(export_plan(engine, dtype), lambda plan, tensors: atomic_directory_write(
        output_dir, _folder_writer(plan, tensors, tokenizer, extra_json), keep=(LOG_SUBDIR, CHECKPOINTS, *keep)))
    barrier()


def _streamed(plan: ExportPlan, write) -> None:
    """write(plan, tensors) on rank 0, taking the plan's tensors one at a time; every rank runs
    through all of them (under ZeRO-3 each is a collective gather), also when rank 0's write
    fails part way."""
    tensors = export_tensors(plan)
    try:
        if is_main():
            write(plan, tensors)
    finally:
        for _ in tensors:  # the other ranks' share of each gather (the rest, if the write failed)
            pass


def _folder_writer(plan: ExportPlan, tensors: Iterator[torch.Tensor], tokenizer, extra_json: dict | None):
    """write(tmp): the weights streamed from `tensors`, then config, generation config, tokenizer
    and the extra JSON files."""
    module = plan.module
    config = module.config
    config.architectures = [type(module).__name__]
    if plan.dtype is not None:
        config.dtype = plan.dtype

    def write(tmp: Path) -> None:
        write_model(tmp, plan.specs, tensors)
        config.save_pretrained(tmp)
        _drop_config_entry(tmp / "config.json", "quantization_config")
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, default=str))
    return write


def save_state_file(engine, path: str | Path) -> None:
    """The engine's module state dict as it is (names, dtypes, tied weights under each name),
    streamed into one safetensors file on rank 0 (every rank must call this under ZeRO-3)."""
    _streamed(export_plan(engine, hf=False), lambda plan, tensors: write_file(path, plan.specs, tensors))


# ------------------------------------------------------------ one tensor at a time

@dataclass
class _Entry:
    spec: Spec  # the tensor as saved: name, full shape, save dtype
    source: torch.Tensor  # the live parameter or buffer (under ZeRO-3 possibly a partition)
    lora: tuple | None = None  # (A, B): the live LoRA parameters of a base weight


@dataclass
class ExportPlan:
    """What the export will write, from metadata alone (nothing gathered or copied yet)."""
    module: torch.nn.Module  # the model the files describe (config, generation config)
    entries: list[_Entry]
    dtype: torch.dtype | None
    scaling: float = 1.0
    fan_in_fan_out: bool = False

    @property
    def specs(self) -> list[Spec]:
        return [e.spec for e in self.entries]


def export_plan(engine, dtype: torch.dtype | None = None, hf: bool = True) -> ExportPlan:
    """The tensors of an engine's export, in file order. hf: as a plain HF model (the reward
    model's wrapper dropped, LoRA folded into base weights, tied weights once), as hf_state_dict
    names them; otherwise the module's own state dict."""
    module = engine.module
    live = module.state_dict(keep_vars=True)  # the parameters themselves: no copy
    lora = {}
    if hf and hasattr(module, "hf_model"):  # a wrapper (RewardModel): the HF model inside it
        module = module.hf_model
        live = {k[len("hf_model."):]: v for k, v in live.items() if k.startswith("hf_model.")}
    if hf and is_lora_wrapped(module):
        lora = dict(pairs=lora_pairs(live), scaling=lora_scaling(module),
                    fan_in_fan_out=lora_fan_in_fan_out(module))
        module = module.get_base_model()
    tied = set(_tied_keys(module)) if hf and getattr(module.config, "tie_word_embeddings", False) else set()
    entries = []
    for key, value in live.items():
        name = key.replace(".base_layer.", ".").removeprefix(PEFT_PREFIX) if lora else key
        if (lora and ".lora_" in key) or name in tied:
            continue  # folded into its base weight / written under the name it is tied to
        spec = Spec(name, tuple(getattr(value, "ds_shape", value.shape)), _save_dtype(value, dtype))
        entries.append(_Entry(spec, value, lora["pairs"].get(key) if lora else None))
    order = {id(s): i for i, s in enumerate(in_file_order([e.spec for e in entries]))}
    entries.sort(key=lambda e: order[id(e.spec)])
    return ExportPlan(module, entries, dtype, lora.get("scaling", 1.0), lora.get("fan_in_fan_out", False))


def export_tensors(plan: ExportPlan) -> Iterator[torch.Tensor | None]:
    """Each entry's tensor as saved (rank 0; None elsewhere), made only when asked for: under
    ZeRO-3 every rank must run through this, each parameter gathered in turn and released once
    the consumer has asked for the next."""
    for entry in plan.entries:
        with gathered([entry.source, *(entry.lora or ())]):
            yield _produce(entry, plan) if is_main() else None


def _produce(entry: _Entry, plan: ExportPlan) -> torch.Tensor:
    """The live tensor on the CPU (no copy when it is there already), cast, LoRA merged. Cast
    before the merge, A and B too, as hf_state_dict does: the same bits either way."""
    tensor = _cast(entry.source.detach().cpu(), plan.dtype)
    if entry.lora is not None:
        lora_a, lora_b = (_cast(t.detach().cpu(), plan.dtype) for t in entry.lora)
        tensor = merged_weight(tensor, lora_a, lora_b, plan.scaling, plan.fan_in_fan_out, entry.spec.name)
    return tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _save_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def gathered(params, modifier_rank: int | None = None):
    """Context in which ZeRO-3-partitioned `params` are whole on every rank (with
    `modifier_rank`, that rank's changes are re-partitioned on exit); a no-op otherwise."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _drop_config_entry(path: Path, key: str) -> None:
    """A converted GGUF config keeps quantization_config; a saved copy must not."""
    data = json.loads(path.read_text())
    if data.pop(key, None) is not None:
        path.write_text(json.dumps(data, indent=2))


def _tied_keys(model) -> list[str]:
    """Names of weights that are tied to another (e.g. lm_head.weight to the embeddings)."""
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)
