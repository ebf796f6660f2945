"""Step 3 generation throughput: our hybrid engine vs generating on the ZeRO-3 engine vs plain HF.

Three variants on the same prompts, each in a fresh subprocess of this script (DeepSpeed patches
torch process-wide, which would slow a baseline sharing its process):
  hybrid     the actor under ZeRO-3 (one process), generating through inference.HybridEngine;
             every timed iteration follows an optimizer step, so the refresh is real work
  zero3      plain HF generate on the ZeRO-3 engine's module (engine.module.generate)
  plain      plain HF generate on the unsharded model, no DeepSpeed
Greedy, eos off (every row generates --new_tokens), batch of --batch prompts of --prompt_len
tokens. Prints tokens/s side by side, the ratios hybrid/zero3 (target >= 5x) and hybrid/plain
(target >= 0.9x), the hybrid's gather/refresh seconds per iteration and each variant's peak RSS.

    python -m bench.hybrid_generation                              # smollm2-135m, batch 8, 32 + 64
    python -m bench.hybrid_generation --model tiny-llama --out /tmp/hybrid.json
"""
from __future__ import annotations

import argparse
import json
import resource
import time

from bench.child import best_runs, child_or_runs

VARIANTS = {
    "hybrid": "hybrid engine, actor under ZeRO-3",
    "zero3": "HF generate on the ZeRO-3 engine's module",
    "plain": "HF generate on the plain unsharded model",
}


def make_prompts(tokenizer, batch: int, prompt_len: int):
    """Seeded random ids, left-padded rows of a few lengths (pads exercise the mask)."""
    import torch
    gen = torch.Generator().manual_seed(0)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), 20000)) if i not in specials]
    ids = torch.tensor(vocab)[torch.randint(len(vocab), (batch, prompt_len), generator=gen)]
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = (row % 4) * prompt_len // 8  # 0, 1/8, 2/8, 3/8 of the prompt is padding
        ids[row, :pad] = tokenizer.pad_token_id
        mask[row, :pad] = 0
    return ids, mask


def greedy_config(args, tokenizer):
    from inference.generation import generation_config
    return generation_config(max_new_tokens=args.new_tokens, do_sample=False, temperature=1.0,
                             top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)


def build_engine(strategy, args, model):
    from utils.strategy import TrainSpec
    engine, _ = strategy.prepare_trained(model, TrainSpec(lr=1e-5, weight_decay=0.0, lora_lr=1e-5, zero_stage=3,
                                                          micro_batch=args.batch, scheduler="constant"))
    return engine


def train_step(engine, ids, mask) -> None:
    labels = ids.masked_fill(mask == 0, -100)
    loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
    engine.backward(loss)
    engine.step()


def run_variant(args) -> dict:
    import torch
    from transformers import GenerationConfig

    from utils.strategy import DeepSpeedStrategy
    from utils.model import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    ids, mask = make_prompts(tokenizer, args.batch, args.prompt_len)
    model = load_causal_lm(path, tokenizer, dtype=resolve_dtype(args.dtype, "cpu"))
    model.generation_config = GenerationConfig()  # eos off: no checkpoint default fills it back in
    config = greedy_config(args, tokenizer)
    if args.variant == "plain":
        model.eval()
        generate = lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # noqa: E731
        step = None
    else:
        strategy = DeepSpeedStrategy(args.dtype)
        strategy.setup_distributed()
        engine = build_engine(strategy, args, model)
        step = lambda: train_step(engine, ids, mask)  # noqa: E731
        if args.variant == "zero3":
            def generate():
                engine.eval()
                try:
                    return engine.module.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                finally:
                    engine.train()
        else:
            from inference.hybrid_engine import HybridEngine
            hybrid = HybridEngine(engine, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                                  tp_gather_partition_size=args.tp_gather_partition_size)
            generate = lambda: hybrid.generate(ids, mask, max_new_tokens=args.new_tokens, do_sample=False)  # noqa: E731
    return measure(args, generate, step, hybrid if args.variant == "hybrid" else None)


def measure(args, generate, step, hybrid) -> dict:
    import torch
    with torch.no_grad():
        start = time.perf_counter()
        out = generate()  # warm-up; for the hybrid engine this builds the inference copy
        first_s = time.perf_counter() - start
    first_tokens = out[:, args.prompt_len:].tolist()  # before any step: comparable across variants
    build_s = hybrid.last_stats["gather_s"] if hybrid else None
    runs = []
    for _ in range(args.iters):
        if step is not None:
            step()  # the weights move, as in PPO: the next generate must pick them up
        with torch.no_grad():
            start = time.perf_counter()
            out = generate()
            seconds = time.perf_counter() - start
        run = {"seconds": seconds, "tokens_per_s": args.batch * args.new_tokens / seconds}
        if hybrid:
            run.update(gather_s=hybrid.last_stats["gather_s"], generate_s=hybrid.last_stats["generate_s"],
                       generate_tokens_per_s=hybrid.last_stats["tokens_per_s"])
        runs.append(run)
    assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"variant": args.variant, "first_call_s": first_s, "build_s": build_s, "runs": runs,
            "tokens_per_s": best["tokens_per_s"],
            "gather_s": sum(r.get("gather_s", 0) for r in runs) / len(runs) if hybrid else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "tokens": first_tokens}


def report(args, best: dict) -> dict:
    print(f"\nGeneration throughput, {args.model}, {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt_len} + {args.new_tokens} new tokens (greedy, eos off), best of "
          f"{args.iters} x {args.repeats}, {best['plain']['threads']} torch threads")
    print(f"{'variant':<46} {'tokens/s':>9} {'peak RSS MB':>12}")
    for name, r in best.items():
        print(f"{VARIANTS[name]:<46} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f}")
    hybrid = best["hybrid"]
    summary = {"hybrid_over_zero3": hybrid["tokens_per_s"] / best["zero3"]["tokens_per_s"],
               "hybrid_over_plain": hybrid["tokens_per_s"] / best["plain"]["tokens_per_s"],
               "gather_s_per_iteration": hybrid["gather_s"], "build_s": hybrid["build_s"],
               "same_tokens_as_plain": hybrid["tokens"] == best["plain"]["tokens"],
               "zero3_same_tokens_as_plain": best["zero3"]["tokens"] == best["plain"]["tokens"]}
    print(f"hybrid / ZeRO-3 module: {summary['hybrid_over_zero3']:.2f}x (target >= 5)")
    print(f"hybrid / plain:         {summary['hybrid_over_plain']:.2f}x (target >= 0.9)")
    print(f"hybrid refresh (ZeRO-3 gather + copy) per iteration: {hybrid['gather_s']:.3f} s; "
          f"first build: {hybrid['build_s']:.3f} s")
    print(f"greedy tokens identical to plain: hybrid {summary['same_tokens_as_plain']}, "
          f"ZeRO-3 module {summary['zero3_same_tokens_as_plain']}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="auto, bf16 or fp32 (auto: see utils.model)")
    parser.add_argument("--iters", type=int, default=2, help="timed generations per run")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per variant")
    parser.add_argument("--tp_gather_partition_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    args = parser.parse_args()

    runs = child_or_runs("bench.hybrid_generation", VARIANTS, args, run_variant, skip=("out", "repeats", "variants"))
    if runs is None:  # a child: it has reported its one variant
        return
    summary = report(args, best_runs(runs))
    if args.out:
        for results in runs.values():
            for r in results:
                r.pop("tokens")
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
