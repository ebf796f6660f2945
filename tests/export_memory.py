"""Peak memory of saving a random llama-shaped model, measured in this process (used by
tests/test_export.py; run by hand for bigger models):

    python -m tests.export_memory --path new|old --hidden 1024 --layers 24 [--dtype bf16] [--lora]

Builds the model (fp32), resets the peak resident set (5 > /proc/self/clear_refs), saves it
through the streaming export (`new`) or the old in-memory one (`old`: hf_state_dict, then
huggingface_hub's save_torch_state_dict), and prints JSON: the model's bytes and the growth of
VmHWM over the resident set before the save. No DeepSpeed: the engine is a stand-in with
`module` (ZeRO 0's case, where the parameters are whole on the one rank).
"""
from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def model(hidden: int, layers: int, vocab: int, lora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab)
    with torch.no_grad():
        net = LlamaForCausalLM(config)
    if lora:
        from utils.model import apply_lora
        net = apply_lora(net, 8)
    return net


def save(engine, path: str, out: Path, dtype) -> None:
    from utils.safetensors_stream import write_model
    from utils.strategy import export
    if path == "new":  # what save_hf_model writes its weights with
        plan = export.export_plan(engine, dtype)
        write_model(out, plan.specs, export.export_tensors(plan))
        return
    from huggingface_hub import save_torch_state_dict
    module, state = export.hf_state_dict(engine, dtype)
    tied = export._tied_keys(module) if getattr(module.config, "tie_word_embeddings", False) else []
    save_torch_state_dict({k: v.contiguous() for k, v in state.items() if k not in tied}, out)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--path", choices=["new", "old"], required=True)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=["bf16"], default=None)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("huggingface_hub", "utils.strategy.export"):  # imported before measuring: modules
        importlib.import_module(name)                          # are not the save's memory (DeepSpeed: ~100 MB)
    net = model(args.hidden, args.layers, args.vocab, args.lora)
    engine = SimpleNamespace(module=net, zero_optimization_stage=lambda: 0)
    dtype = torch.bfloat16 if args.dtype else None
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = status_kb("VmRSS")
        start = time.perf_counter()
        save(engine, args.path, Path(tmp), dtype)
        seconds = time.perf_counter() - start
        peak = status_kb("VmHWM")
        written = sum(p.stat().st_size for p in Path(tmp).iterdir() if "safetensors" in p.name)
    params = sum(p.numel() for p in net.parameters())
    print(json.dumps({"path": args.path, "params": params, "model_bytes": params * 4, "written_bytes": written,
                      "rss_before_mb": before / 1024, "peak_growth_mb": (peak - before) / 1024,
                      "save_s": round(seconds, 2)}))


if __name__ == "__main__":
    main()
