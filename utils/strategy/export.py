"""An engine's weights as a plain Hugging Face model: gathered from ZeRO shards, the reward
model's wrapper dropped, LoRA merged, written atomically as safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from utils.dist import barrier, is_main
from utils.fs import CHECKPOINTS, LOG_SUBDIR, atomic_directory_write
from utils.model.lora import is_lora_wrapped, lora_fan_in_fan_out, lora_scaling, merge_lora_state_dict


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
    if is_lora_wrapped(module):
        state = merge_lora_state_dict(state, lora_scaling(module), lora_fan_in_fan_out(module))
        module = module.get_base_model()
    return module, state


def save_hf_model(engine, tokenizer, output_dir: str | Path, extra_json: dict | None = None,
                  dtype: torch.dtype | None = None, keep: tuple[str, ...] = ()) -> None:
    """Save an engine's model as a plain Hugging Face directory (safetensors + tokenizer).

    ZeRO-3 shards are gathered (every rank must call this); LoRA is merged into the base
    weights on a copy of the state dict, so the live training model is left as it was.
    `dtype` casts the floating-point weights (the fp32 EMA is saved in the training dtype).
    Written atomically: a crash while saving leaves `output_dir` as it was before. The run's
    logs and checkpoints in it survive the replacement, and so do the entries named in `keep`."""
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
            for name, payload in (extra_json or {}).items():
                (tmp / name).write_text(json.dumps(payload, indent=2, default=str))

        atomic_directory_write(output_dir, write, keep=(LOG_SUBDIR, CHECKPOINTS, *keep))
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
