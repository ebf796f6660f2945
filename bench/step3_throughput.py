"""Step 3 throughput side by side: our engine set-ups and TRL's PPO trainer on the same work.

Every variant is a real PPO run in its own subprocess with the same actor, critic/reward model,
prompts, batch size, prompt and answer lengths and number of iterations: ours through
`training.step3_rlhf_finetuning.main`, the peer through TRL 1.12's `trl.experimental.ppo`
(`bench.trl_peer`, in an environment from `bench.peer_env`). Fixed work per iteration on both
sides: every prompt is exactly --prompt_len tokens (questions of the bundled task joined and cut
from the left by our data layer; TRL gets the same token ids) and eos is disabled, so each
iteration generates batch x --answer_len tokens; one optimizer step per model per iteration.
The first iteration (engine builds, first inference-copy build) is left out of every mean.

Prints samples/s, generation tokens/s, per-phase effective TFLOPs (the matmuls each phase runs,
utils.flops) and their share of the machine's measured matmul peak (bench.peak), peak memory,
TFLOP per sample (ours), and each variant's samples/s as a ratio to TRL's (target >= 3x);
`--json FILE` keeps the numbers.

    python -m bench.step3_throughput                                  # tiny-llama, quick
    python -m bench.step3_throughput --actor output/step1_sft --critic output/step2_reward
    python -m bench.step3_throughput --device cuda --actor facebook/opt-1.3b \\
        --critic facebook/opt-350m --prompt_len 256 --answer_len 256 --batch 16   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OURS = {
    "zero2+hybrid": ["--actor_zero_stage", "2", "--critic_zero_stage", "2"],
    "zero2, plain generate": ["--actor_zero_stage", "2", "--critic_zero_stage", "2", "--no-enable_hybrid_engine"],
    "zero3+hybrid": ["--actor_zero_stage", "3", "--critic_zero_stage", "3"],
    "zero3, plain generate": ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--no-enable_hybrid_engine"],
}
PEER = "trl ppo"
COLUMNS = ("samples_per_s", "generation_tokens_per_s", "generation_tflops", "training_tflops", "tflops",
           "generation_s", "scoring_s", "training_s", "peak_memory_gb")
LOGGED = (*COLUMNS, "flops_per_sample")  # ours only: the peer's rounds are not counted


def child_env(device: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark stays on the CPU even on a GPU machine
    return env


def write_prompt_file(path: Path, actor: str, prompt_len: int, count: int) -> None:
    """`count` prompts of at least prompt_len tokens (bundled questions joined); the data layer
    keeps the last prompt_len tokens of each, so every prompt ends up exactly that long."""
    from utils.data import bundled
    from utils.data.pipeline import encode
    from utils.data.raw_datasets import as_answer, human_prompt
    from utils.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(actor))
    examples = bundled.generate_examples(num=4 * count + 64, seed=1)
    rows, at = [], 0
    while len(rows) < count:
        parts = []
        while len(encode(tokenizer, [human_prompt(" ".join(parts))], True)[0]) <= prompt_len:
            parts.append(examples[at % len(examples)]["prompt"])
            at += 1
        chosen = examples[(at - 1) % len(examples)]
        rows.append({"prompt": human_prompt(" ".join(parts)), "chosen": as_answer(chosen["chosen"]),
                     "rejected": as_answer(chosen["rejected"])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_ours(name: str, args, data: Path, workdir: Path) -> dict:
    out = workdir / name.replace(" ", "_").replace(",", "").replace("+", "_")
    cmd = [sys.executable, "-m", "training.step3_rlhf_finetuning.main",
           "--actor_model_name_or_path", args.actor, "--critic_model_name_or_path", args.critic,
           "--data_path", str(data), "--data_split", "0,0,1", "--data_output_path", str(workdir / "data"),
           "--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size", str(args.batch),
           "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(args.answer_len),
           "--ignore_eos", "--num_warmup_steps", "0", "--max_rounds", str(args.rounds),
           "--dtype", args.dtype, "--seed", str(args.seed), "--disable_tqdm", "--output_dir", str(out),
           *OURS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.device))
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # drop the warm-up round
    means = {c: sum(r[f"train/{c}"] for r in timed) / len(timed) for c in LOGGED}
    means["peak_memory_gb"] = max(r["train/peak_memory_gb"] for r in rows)
    means["generated_tokens_per_round"] = sum(r["train/generated_tokens"] for r in rows) / len(rows)
    means["optimizer_steps_per_round"] = 2  # actor and critic
    return means


def run_peer(args, data: Path, workdir: Path) -> dict:
    from bench.child import read_result
    from bench.peer_env import trl_python

    cmd = [trl_python(), "-m", "bench.trl_peer", "--actor", args.actor, "--critic", args.critic,
           "--data", str(data), "--cache", str(workdir / "data"), "--batch", str(args.batch),
           "--prompt_len", str(args.prompt_len), "--answer_len", str(args.answer_len),
           "--rounds", str(args.rounds), "--dtype", args.dtype, "--seed", str(args.seed)]
    return read_result(subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.device)), PEER)


def print_table(results: dict, peak: float, args) -> None:
    print(f"\nStep 3, actor {args.actor}, critic {args.critic}, batch {args.batch}, prompt {args.prompt_len} + "
          f"answer {args.answer_len} tokens (eos off), {args.rounds} iterations (first left out), "
          f"dtype {args.dtype}, {args.device}; matmul peak {peak / 1e12:.4f} TFLOP/s")
    heads = ("samples/s", "gen tok/s", "gen TFLOPs", "train TFLOPs", "TFLOPs", "gen %peak", "train %peak",
             "gen s", "score s", "train s", "peak GB", "TFLOP/sample", "vs TRL")
    print(f"{'variant':24s}" + "".join(f"{h:>13s}" for h in heads))
    base = results.get(PEER, {}).get("samples_per_s")
    for name, r in results.items():
        cells = [r.get(c) for c in COLUMNS[:5]]
        cells += [r["generation_tflops"] * 1e12 / peak * 100 if "generation_tflops" in r else None,
                  r["training_tflops"] * 1e12 / peak * 100 if "training_tflops" in r else None]
        cells += [r.get(c) for c in COLUMNS[5:]]
        cells += [r["flops_per_sample"] / 1e12 if "flops_per_sample" in r else None]
        ratio = f"{r['samples_per_s'] / base:12.2f}x" if base else f"{'-':>13s}"
        print(f"{name:24s}" + "".join(f"{c:13.4g}" if c is not None else f"{'-':>13s}" for c in cells) + ratio)
    print("work per iteration: " + "; ".join(
        f"{name} {r['generated_tokens_per_round']:.0f} generated tokens, {r['optimizer_steps_per_round']} "
        "optimizer step(s)" for name, r in results.items()))


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--actor", default="tiny-llama")
    parser.add_argument("--critic", default="tiny-llama")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--answer_len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--variants", nargs="*", default=[*OURS, PEER], choices=[*OURS, PEER])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import torch

    from bench.peak import matmul_peak_flops
    from utils.model import resolve_dtype_name
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.dtype = resolve_dtype_name(args.dtype, args.device)
    peak = matmul_peak_flops(args.dtype, args.device)
    with tempfile.TemporaryDirectory(prefix="step3-bench-") as tmp:
        data = Path(tmp) / "prompts.jsonl"
        write_prompt_file(data, args.actor, args.prompt_len, 2 * args.batch * args.rounds + 16)
        results = {}
        for name in args.variants:
            print(f"running {name} ...", flush=True)
            results[name] = run_peer(args, data, Path(tmp)) if name == PEER else run_ours(name, args, data, Path(tmp))
    print_table(results, peak, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "matmul_peak_flops": peak,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
