"""Step 3 throughput: samples/s, generation tokens/s, per-phase effective TFLOPs and peak memory
for several engine set-ups, side by side in one run.

Each variant is a real Step 3 run (`training.step3_rlhf_finetuning.main`, test mode) in its
own subprocess, with the same model, prompts, batch sizes and lengths; the first round (warm-up:
engine builds, first inference-copy build) is left out of the means. Prints a table with each
variant's samples/s as a ratio to the first one; `--json FILE` keeps the numbers.

    python -m bench.step3_throughput                                  # tiny-llama, quick
    python -m bench.step3_throughput --actor output/step1_sft --critic output/step2_reward \\
        --prompt_len 64 --answer_len 32 --batch 8 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "zero2+hybrid": ["--actor_zero_stage", "2", "--critic_zero_stage", "2"],
    "zero2, plain generate": ["--actor_zero_stage", "2", "--critic_zero_stage", "2", "--no-enable_hybrid_engine"],
    "zero3+hybrid": ["--actor_zero_stage", "3", "--critic_zero_stage", "3"],
    "zero3, plain generate": ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--no-enable_hybrid_engine"],
}
COLUMNS = ("samples_per_s", "generation_tokens_per_s", "generation_tflops", "training_tflops", "tflops",
           "generation_s", "scoring_s", "training_s", "peak_memory_gb")


def run_variant(name: str, args, workdir: Path) -> dict:
    out = workdir / name.replace(" ", "_").replace(",", "").replace("+", "_")
    cmd = [sys.executable, "-m", "training.step3_rlhf_finetuning.main",
           "--actor_model_name_or_path", args.actor, "--critic_model_name_or_path", args.critic,
           "--data_path", "bundled", "--num_examples", str(max(2000, 4 * args.batch * args.rounds)),
           "--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size", str(args.batch),
           "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(args.answer_len),
           "--num_warmup_steps", "0", "--enable_test_mode", "--test_stop_step", str(args.rounds),
           "--dtype", args.dtype, "--disable_tqdm", "--output_dir", str(out), *VARIANTS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # drop the warm-up round
    means = {c: sum(r[f"train/{c}"] for r in timed) / len(timed) for c in COLUMNS}
    means["peak_memory_gb"] = max(r["train/peak_memory_gb"] for r in rows)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actor", default="tiny-llama")
    parser.add_argument("--critic", default="tiny-llama")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--answer_len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="step3-bench-") as tmp:
        results = {name: run_variant(name, args, Path(tmp)) for name in args.variants}
    base = results[args.variants[0]]["samples_per_s"]
    print(f"Step 3, actor {args.actor}, critic {args.critic}, batch {args.batch}, prompt {args.prompt_len} + "
          f"answer {args.answer_len}, {args.rounds} rounds (first left out), dtype {args.dtype}")
    print(f"{'variant':24s} " + " ".join(f"{c[:14]:>14s}" for c in COLUMNS) + "   ratio")
    for name, r in results.items():
        print(f"{name:24s} " + " ".join(f"{r[c]:14.4g}" for c in COLUMNS) + f"   {r['samples_per_s'] / base:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
