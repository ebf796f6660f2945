"""Saves real DeepSpeed engines through the streaming export and the old in-memory one, and
writes what it found as JSON (tests/test_export.py runs this in a subprocess: DeepSpeed patches
torch process-wide, so engines must not live in the pytest process).

    python -m tests.export_check --out DIR [--only SCENARIO ...]
    deepspeed --num_gpus 2 --master_port P --module tests.export_check --out DIR --only ...  (ZeRO-3 ones)

Per scenario (ZeRO stage, LoRA or not, family, engine dtype, save dtype, reward model wrapper):
- `same_files`: the streamed safetensors hold exactly the tensors (names, dtypes, shapes, bits)
  that hf_state_dict + huggingface_hub's save_torch_state_dict wrote before;
- `same_reload`: transformers loads both folders to bit-identical state dicts, no key missing;
- `held_bytes` / `largest_bytes`: the most bytes of produced tensors alive at once while writing,
  against the largest single tensor (the bound: one tensor, not the model);
- `shards`: files written (one scenario shrinks the shard size to force several).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import weakref
from pathlib import Path

import torch

import utils.safetensors_stream as stream
import utils.strategy.export as export
from tests.hybrid_engine_check import build_engine, with_lora
from utils import dist
from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
from utils.model.reward_model import load_reward_model
from utils.strategy import DeepSpeedStrategy

BF16, FP32 = torch.bfloat16, torch.float32
# name: (model, ZeRO stage, LoRA, engine dtype, save dtype, reward model, shard bytes)
SCENARIOS = {
    "llama_lora_zero0": ("tiny-llama", 0, True, "fp32", None, False, None),
    "gpt2_lora_zero2": ("tiny-gpt2", 2, True, "fp32", None, False, None),  # Conv1D, tied embeddings
    "llama_lora_zero3": ("tiny-llama", 3, True, "fp32", None, False, None),
    "gpt2_lora_zero3_bf16": ("tiny-gpt2", 3, True, "bf16", None, False, None),
    "llama_zero2_fp32_to_bf16": ("tiny-llama", 2, False, "fp32", BF16, False, None),
    "llama_lora_zero3_fp32_to_bf16": ("tiny-llama", 3, True, "fp32", BF16, False, None),
    "gpt2_zero3_sharded": ("tiny-gpt2", 3, False, "fp32", None, False, 400_000),
    "reward_lora_zero2": ("tiny-llama", 2, True, "fp32", None, True, None),
    "reward_zero3_bf16": ("tiny-llama", 3, False, "bf16", None, True, None),
}


class Held:
    """Tracks tensors the export produced that are still alive whenever the writer takes one."""

    def __init__(self):
        self.alive, self.most = [], 0
        real_produce, real_raw = export._produce, stream._raw_bytes

        def produce(entry, plan):
            tensor = real_produce(entry, plan)
            self.alive.append((weakref.ref(tensor), tensor.numel() * tensor.element_size()))
            return tensor

        def raw_bytes(spec, tensor):
            self.alive = [(ref, n) for ref, n in self.alive if ref() is not None]
            self.most = max(self.most, sum(n for _, n in self.alive))
            return real_raw(spec, tensor)
        export._produce, stream._raw_bytes = produce, raw_bytes


def build(name, stage, lora, dtype, reward, tokenizer):
    path = resolve_model_path(name)
    model = load_reward_model(path, tokenizer) if reward else load_causal_lm(path, tokenizer)
    if lora:
        if reward:
            model.hf_model = with_lora(model.hf_model)
        else:
            model = with_lora(model)
    return build_engine(model.train(), stage, dtype)


def old_export(engine, dtype, folder: Path) -> None:
    """What save_hf_model wrote before it streamed: the whole state dict, then save_torch_state_dict
    (ZeRO-3's gather through DeepSpeed's consolidated state dict: every rank takes part)."""
    from huggingface_hub import save_torch_state_dict
    exported = export.hf_state_dict(engine, dtype)
    if not dist.is_main():
        return
    module, state = exported
    tied = export._tied_keys(module) if getattr(module.config, "tie_word_embeddings", False) else []
    save_torch_state_dict({k: v.contiguous() for k, v in state.items() if k not in tied}, folder)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def bits_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def reload(folder: Path, reward: bool) -> tuple[dict, list]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model, info = auto.from_pretrained(folder, dtype="auto", output_loading_info=True)
    return model.state_dict(), sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])


def scenario(name, stage, lora, dtype, save_dtype, reward, shard_bytes, tokenizer, out: Path) -> dict:
    engine = build(name, stage, lora, dtype, reward, tokenizer)
    new, old = out / "new", out / "old"
    held = Held()
    stream.MAX_SHARD_BYTES = shard_bytes or 5 * 10**9
    export.save_hf_model(engine, tokenizer, new, dtype=save_dtype)
    if dist.is_main():
        shutil.copytree(new, old, ignore=shutil.ignore_patterns("*.safetensors*"))
    old_export(engine, save_dtype, old)
    if not dist.is_main():
        return {}
    new_state, new_problems = reload(new, reward)
    old_state, old_problems = reload(old, reward)
    files = weights(new)
    return {"same_files": bits_equal(files, weights(old)), "same_reload": bits_equal(new_state, old_state),
            "load_problems": new_problems + old_problems, "held_bytes": held.most,
            "largest_bytes": max(v.numel() * v.element_size() for v in files.values()),
            "model_bytes": sum(v.numel() * v.element_size() for v in files.values()),
            "shards": sorted(p.name for p in new.iterdir() if "safetensors" in p.name),
            "dtypes": sorted({str(v.dtype) for v in files.values()})}


def control(tokenizer, out: Path) -> dict:
    """Held's measure can fail: an export that makes every tensor before writing the first
    (what a dict-building export does) is caught holding about the whole model."""
    engine = build("tiny-llama", 2, False, "fp32", False, tokenizer)
    held, streamed = Held(), export.export_tensors
    export.export_tensors = lambda plan: iter(list(streamed(plan)))
    try:
        export.save_hf_model(engine, tokenizer, out, dtype=BF16)
    finally:
        export.export_tensors = streamed
    return {"held_bytes": held.most, "model_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher adds it
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    DeepSpeedStrategy().setup_distributed()
    tokenizer = load_tokenizer(resolve_model_path("tiny-llama"))
    out = Path(args.out)
    results = {}
    real = export._produce, stream._raw_bytes
    for key, spec in SCENARIOS.items():
        if args.only is None or key in args.only:
            results[key] = scenario(*spec, tokenizer, out / key)
            export._produce, stream._raw_bytes = real  # undo Held's instruments
    if args.only is None and dist.world_size() == 1:
        results["control_hoarding"] = control(tokenizer, out / "control")
        export._produce, stream._raw_bytes = real
    if dist.is_main():
        (out / "export.json").write_text(json.dumps(results, indent=1))
    DeepSpeedStrategy.shutdown()


if __name__ == "__main__":
    main()
