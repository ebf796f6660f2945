"""Step 1 training throughput: our DeepSpeed ZeRO-2 path vs a plain PyTorch loop.

Both run the same model on the same batches of the bundled data (same order, same padding)
for the same number of optimizer steps, each in a fresh subprocess of this script (DeepSpeed
patches torch process-wide, which would slow a baseline sharing its process). Prints a table
and the ratio; target: DeepSpeed tokens/s >= 0.85x the plain loop.

    python -m bench.step1_throughput                        # smollm2-135m, batch 8, --dtype auto
    python -m bench.step1_throughput --model tiny-llama --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import time

from bench.child import best_runs, child_or_runs

VARIANTS = {
    "plain": "plain PyTorch loop, torch AdamW(fused)",
    "deepspeed": "DeepSpeed ZeRO-2 (our Step 1 engine)",
}


def batches(batch_size: int, seq_len: int, count: int, tokenizer):
    """`count` fixed SFT batches of the bundled data, padded to the same length."""
    from utils.config import cache_dir
    from utils.data import DataCollatorSFT, create_prompt_dataset

    train, _ = create_prompt_dataset(["bundled"], "10,0,0", str(cache_dir() / "data"), 1, 1234,
                                     tokenizer, seq_len, eos_token_id=tokenizer.eos_token_id)
    collate = DataCollatorSFT(tokenizer.pad_token_id)
    out = []
    for i in range(count):
        items = [train[(i * batch_size + j) % len(train)] for j in range(batch_size)]
        out.append(collate(items))
    return out


def run_variant(args) -> dict:
    import torch

    from utils.strategy import DeepSpeedStrategy, TrainSpec
    from utils.model import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
    from utils.losses import causal_lm_loss

    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype, "cpu")
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    data = batches(args.batch_size, args.seq_len, args.steps + args.warmup, tokenizer)

    if args.variant == "deepspeed":
        strategy = DeepSpeedStrategy(args.dtype)
        strategy.setup_distributed()
        model = load_causal_lm(path, tokenizer, dtype=dtype)
        engine, _ = strategy.prepare_trained(model, TrainSpec(lr=1e-5, weight_decay=0.0, lora_lr=1e-4, zero_stage=2,
                                                              micro_batch=args.batch_size, scheduler="constant"))

        def step(batch):
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = causal_lm_loss(logits, batch["labels"])
            engine.backward(loss)
            engine.step()
            return loss
    else:
        model = load_causal_lm(path, tokenizer, dtype=dtype)
        # In bf16, fp32 master weights as DeepSpeed's bf16 mode keeps them: the optimizer
        # updates the fp32 copy and the bf16 weights are refreshed from it. In fp32 the
        # "copy" is the parameter itself.
        master = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
                  for p in model.parameters()]
        optimizer = torch.optim.AdamW(master, lr=1e-5, betas=(0.9, 0.95), fused=True)

        def step(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = causal_lm_loss(logits, batch["labels"])
            loss.backward()
            for p, m in zip(model.parameters(), master):
                if m is not p:
                    m.grad, p.grad = p.grad.float(), None
            torch.nn.utils.clip_grad_norm_(master, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(model.parameters(), master):
                    if m is not p:
                        p.copy_(m)
            return loss

    for batch in data[:args.warmup]:
        step(batch)
    tokens = sum(int(b["attention_mask"].sum()) for b in data[args.warmup:])
    padded = sum(b["input_ids"].numel() for b in data[args.warmup:])
    start = time.perf_counter()
    losses = [step(batch).item() for batch in data[args.warmup:]]
    elapsed = time.perf_counter() - start
    if args.variant == "deepspeed":
        DeepSpeedStrategy.shutdown()
    return {"variant": args.variant, "seconds": elapsed, "steps": args.steps,
            "tokens_per_s": tokens / elapsed, "padded_tokens_per_s": padded / elapsed,
            "samples_per_s": args.steps * args.batch_size / elapsed,
            "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="auto, bf16 or fp32 (auto: see utils.model)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per variant")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    results = child_or_runs("bench.step1_throughput", VARIANTS, args, run_variant, skip=("json", "repeats"))
    if results is None:  # a child: it has reported its one variant
        return
    best = best_runs(results)
    print(f"\nStep 1 throughput, {args.model}, {args.dtype}, batch {args.batch_size}, {args.steps} steps "
          f"(best of {args.repeats} alternating runs), {os.cpu_count()} CPU threads")
    print(f"{'variant':<52} {'tokens/s':>9} {'samples/s':>10} {'s/step':>7}")
    for name, r in best.items():
        print(f"{VARIANTS[name]:<52} {r['tokens_per_s']:>9.1f} {r['samples_per_s']:>10.2f} "
              f"{r['seconds'] / r['steps']:>7.3f}")
    ratio = best["deepspeed"]["tokens_per_s"] / best["plain"]["tokens_per_s"]
    print(f"ratio DeepSpeed ZeRO-2 / plain PyTorch: {ratio:.2f}x (target >= 0.85)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
