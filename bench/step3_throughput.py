"""Step 3 throughput side by side: our engine set-ups and TRL's trainers on the same work.

Every row is a real Step 3 run in its own subprocess on the same actor, prompts, prompt and
answer lengths and number of rounds, and each of ours is compared with TRL's trainer of its own
algorithm:
  PPO   ours (actor + critic, --critic as critic and reward model; ZeRO 2/3, hybrid engine or
        plain generate) through `training.step3_rlhf_finetuning.main`, against TRL 1.12's
        `trl.experimental.ppo` (`bench.trl_peer`): --batch prompts x 1 answer a round
  GRPO  ours (`--advantage grpo`, no critic; ZeRO 2, hybrid or plain generate) against TRL 1.16's
        GRPOTrainer (`bench.trl_grpo_peer`), both built by `bench.grpo_vs_trl` from its matched
        settings (model, KL weight --kl_ctl as a k3 term in the loss = TRL beta, lr
        --learning_rate, AdamW, temperature 1, dtype, seed, loss, gradient clipping): --batch
        prompts x --samples_per_prompt answers a round, all in one micro-batch and ONE optimizer
        step a round on both sides. Reward on both: `question_reward` (the bundled checker on
        each row's last question, a data column both sides pass to the function)
TRL runs in a cached environment with its version (`bench.peer_env`).

Fixed work per round on both sides: every prompt is exactly --prompt_len tokens (bundled
questions joined, words dropped from the front; our data layer encodes them without a cut and
TRL gets the same token ids, or for GRPO the same text, checked to give the same ids), and eos
never ends an answer (ours --ignore_eos; TRL PPO stop_token None, TRL GRPO min_new_tokens), so a
round generates answers x --answer_len tokens; one optimizer step of each trained model (TRL PPO
steps policy and value head in one optimizer). Each row records its work per round as measured
(answers, generated tokens, optimizer steps); the benchmark stops if any row did other work.

Timing: a round is the wall time from one round's end to the next's (ours: the rounds' log lines;
TRL: its step-end callback), so the first round (engine builds) is left out of every mean.
Prints samples/s (samples = answers), generation tokens/s, per-phase effective TFLOPs (the
matmuls each phase runs, utils.flops) and the share of the machine's measured matmul peak that
generation, scoring and training each reach
(bench.peak, sampled before and after each row, the best kept), each row's generation time against the floor its matmuls allow on this machine
(bench.peak.generation_floor_s: decode steps at the measured speed of their own matmuls, which at a
few rows is bound by reading the weights, not by the peak), peak memory, TFLOP per sample of every
row (counted as it ran by bench.flop_count, the same counter on both sides, in a separate
2-round run of the row: the counter slows what it counts, and a first round also does one-time
work such as our packing checks, so its second round is counted), and each row's samples/s as
a ratio to its algorithm's TRL row in the same run ("vs TRL");
`--json FILE` keeps the numbers.

    python -m bench.step3_throughput                                  # tiny-llama, quick
    python -m bench.step3_throughput --actor output/step1_sft --critic output/step2_reward
    python -m bench.step3_throughput --actor smollm2-135m --variants "grpo zero2+hybrid" "trl grpo" \\
        --batch 8 --samples_per_prompt 4 --prompt_len 64 --answer_len 32 --kl_ctl 0.1 --learning_rate 1e-5
    python -m bench.step3_throughput --device cuda --actor facebook/opt-1.3b \\
        --critic facebook/opt-350m --prompt_len 256 --answer_len 256 --batch 16   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.child import child_env
from bench.flop_count import COUNTED_FLOPS, counted_module

PPO = {  # our PPO rows (actor and critic): engine flags
    "zero2+hybrid": ["--actor_zero_stage", "2", "--critic_zero_stage", "2"],
    "zero2, plain generate": ["--actor_zero_stage", "2", "--critic_zero_stage", "2", "--no-enable_hybrid_engine"],
    "zero3+hybrid": ["--actor_zero_stage", "3", "--critic_zero_stage", "3"],
    "zero3, plain generate": ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--no-enable_hybrid_engine"],
}
GRPO = {  # our GRPO rows (actor only): bench.grpo_vs_trl's engine flags
    "grpo zero2+hybrid": ["--zero_stage", "2"],
    "grpo zero2, plain generate": ["--zero_stage", "2", "--ours_args=--no-enable_hybrid_engine"],
}
TRL_PPO, TRL_GRPO = "trl ppo", "trl grpo"
VARIANTS = [*PPO, TRL_PPO, *GRPO, TRL_GRPO]
REWARD_FN = "bench.step3_throughput:question_reward"  # the GRPO rows' reward, both sides
COLUMNS = ("samples_per_s", "generation_tokens_per_s", "generation_tflops", "training_tflops", "tflops",
           "generation_s", "scoring_s", "training_s", "peak_memory_gb")
LOGGED = (*COLUMNS, "scoring_tflops", "flops_per_sample")  # ours only: utils.flops' count of each timed round
# a run's first round also does one-time work (ours: the packing checks), so its second is counted
COUNTED_ROUND = 2
WORK = ("answers", "generated_tokens", "optimizer_steps")  # per round, of each trained model; every row records it


def write_prompt_file(path: Path, actor: str, prompt_len: int, count: int) -> None:
    """`count` prompts of exactly prompt_len tokens: bundled questions joined, words dropped from
    the front until the length fits. The texts need no cut by our data layer, so the GRPO peer
    hands TRL the very text (and ids) ours trains on. Each row's "question" column is its last
    question, always whole: the one `question_reward` checks the answer against."""
    from utils.data import bundled
    from utils.data.raw_datasets import as_answer

    tokens = prompt_length(actor)
    examples = bundled.generate_examples(num=4 * count + 64, seed=1)
    rows, at = [], 0
    while len(rows) < count:
        if at > 8 * len(examples):
            raise SystemExit(f"no joined bundled questions make a prompt of exactly {prompt_len} tokens")
        parts = []
        while not parts or tokens(" ".join(parts)) <= prompt_len:
            parts.append(examples[at % len(examples)]["prompt"])
            at += 1
        text = exact_length_prompt(tokens, parts[:-1], parts[-1], prompt_len)
        last = examples[(at - 1) % len(examples)]
        if text is not None:  # else: no cut hits prompt_len; the next try starts a question later
            rows.append({"prompt": text, "chosen": as_answer(last["chosen"]), "rejected": as_answer(last["rejected"]),
                         "question": last["prompt"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prompt_length(actor: str):
    """question -> token count of its Human/Assistant prompt, as our data layer encodes it."""
    from utils.data.pipeline import encode
    from utils.data.raw_datasets import human_prompt
    from utils.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(actor))
    return lambda question: len(encode(tokenizer, [human_prompt(question)], True)[0])


def exact_length_prompt(tokens, before: list[str], question: str, prompt_len: int) -> str | None:
    """The Human/Assistant prompt of `question` after the longest word suffix of the questions
    `before` it that makes exactly prompt_len tokens, or None (dropping a word can remove two
    tokens at once, and a word can change how its neighbour is split)."""
    from utils.data.raw_datasets import human_prompt

    words = " ".join(before).split(" ") if before else []
    for start in range(len(words) + 1):
        text = " ".join([*words[start:], question])
        if tokens(text) == prompt_len:
            return human_prompt(text)
    return None


def question_reward(prompts, completions, question, **kwargs) -> list[float]:
    """The GRPO rows' reward on both sides (--reward_fn bench.step3_throughput:question_reward):
    the bundled checker's score of each answer to its row's last question. The prompts join
    several questions, which the checker does not parse, so it gets the "question" column."""
    from utils.data import bundled
    return [bundled.score(q, c) for q, c in zip(question, completions)]


def slug(name: str) -> str:
    return name.replace(" ", "_").replace(",", "").replace("+", "_")


def ppo_command(name: str, args, data: Path, workdir: Path, out: Path) -> list[str]:
    """Our Step 3 flags (after python -m) for a PPO variant."""
    return ["--actor_model_name_or_path", args.actor, "--critic_model_name_or_path", args.critic,
            "--data_path", str(data), "--data_split", "0,0,1", "--data_output_path", str(workdir / "data"),
            "--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size", str(args.batch),
            "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(args.answer_len),
            "--ignore_eos", "--num_warmup_steps", "0", "--max_rounds", str(args.rounds),
            "--dtype", args.dtype, "--seed", str(args.seed), "--disable_tqdm", "--output_dir", str(out),
            *PPO[name]]


def grpo_args(name: str, args, data: Path, workdir: Path):
    """bench.grpo_vs_trl's arguments for the GRPO rows: its matched settings (and the command lines
    built from them) on this benchmark's fixed work; `name`'s engine flags for ours."""
    from bench.grpo_vs_trl import build_parser
    return build_parser().parse_args([
        "--sft", args.actor, "--reward_fn", REWARD_FN, "--data_path", str(data), "--data_split", "0,0,1",
        "--rounds", str(args.rounds), "--prompts_per_round", str(args.batch),
        "--samples_per_prompt", str(args.samples_per_prompt), "--micro_batch", "0",
        "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(args.answer_len), "--ignore_eos",
        "--kl_ctl", str(args.kl_ctl), "--learning_rate", str(args.learning_rate), "--dtype", args.dtype,
        "--device", args.device, "--output_dir", str(workdir / slug(name)), "--count_round", str(args.count_round),
        *GRPO.get(name, [])])


def run_grpo_side(name: str, args, data: Path, workdir: Path) -> dict:
    """bench.grpo_vs_trl's run of one side (ours or TRL's) for the GRPO row `name`."""
    from bench import grpo_vs_trl
    gargs = grpo_args(name, args, data, workdir)
    gargs.output_dir.mkdir(parents=True, exist_ok=True)
    return (grpo_vs_trl.run_trl if name == TRL_GRPO else grpo_vs_trl.run_ours)(gargs, args.seed)


def one_value(values: list, what: str, name: str):
    """The value every round shares; a benchmark whose rounds did different work is void."""
    if len(set(values)) != 1:
        raise SystemExit(f"{name}: {what} per round differ between rounds: {values}")
    return values[0]


def ours_result(name: str, out: Path) -> dict:
    """Our run's means over its timed rounds (metrics.jsonl) and its work per round."""
    from utils.metrics import read_jsonl
    rows = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "train/samples_per_s" in r]
    timed = rows[1:] or rows  # drop the warm-up round
    means = {c: sum(r[f"train/{c}"] for r in timed) / len(timed) for c in LOGGED}
    means["peak_memory_gb"] = max(r["train/peak_memory_gb"] for r in rows)
    means["work"] = {key: one_value([r[f"train/{key}"] for r in rows], key, name) for key in WORK}
    counted = out / COUNTED_FLOPS  # a counted run's (bench.flop_count)
    means["counted_flops"] = json.loads(counted.read_text())["flops"] if counted.is_file() else None
    if len(rows) > 1:  # timed as the peers are: from one round's end (its log line) to the next's
        means["round_s"] = (rows[-1]["time"] - rows[0]["time"]) / len(timed)
        means["samples_per_s"] = means["work"]["answers"] / means["round_s"]
    return means


def run_ours(name: str, args, data: Path, workdir: Path) -> dict:
    if name in GRPO:
        return ours_result(name, Path(run_grpo_side(name, args, data, workdir)["model"]).parent)
    out = workdir / slug(name)
    cmd = [sys.executable, "-m", *counted_module(out / COUNTED_FLOPS, args.count_round),
           "training.step3_rlhf_finetuning.main", *ppo_command(name, args, data, workdir, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.device))
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return ours_result(name, out)


def run_trl_ppo(args, data: Path, workdir: Path) -> dict:
    from bench.child import read_result
    from bench.peer_env import trl_python

    cmd = [trl_python("1.12"), "-m", "bench.trl_peer", "--actor", args.actor, "--critic", args.critic,
           "--data", str(data), "--cache", str(workdir / "data"), "--batch", str(args.batch),
           "--prompt_len", str(args.prompt_len), "--answer_len", str(args.answer_len),
           "--rounds", str(args.rounds), "--dtype", args.dtype, "--seed", str(args.seed),
           "--count_round", str(args.count_round)]
    return read_result(subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.device)), TRL_PPO)


def trl_grpo_result(side: dict) -> dict:
    """The GRPO peer's per-round numbers (bench.trl_grpo_peer) as a row: the first round left out."""
    timed, gen = side["round_s"][1:] or side["round_s"], side["generation_s"][1:] or side["generation_s"]
    work = {"answers": one_value([s["answers"] for s in side["scored"]], "answers", TRL_GRPO),
            "generated_tokens": one_value([s["tokens"] for s in side["scored"]], "generated tokens", TRL_GRPO),
            "optimizer_steps": side["optimizer_steps"] / len(side["round_s"])}
    return {"samples_per_s": work["answers"] * len(timed) / sum(timed), "round_s": sum(timed) / len(timed),
            "generation_tokens_per_s": work["generated_tokens"] * len(gen) / sum(gen),
            "generation_s": sum(gen) / len(gen), "peak_memory_gb": side["peak_memory_gb"], "work": work,
            "trl_completion_length": side["completion_length"],  # TRL's own log, per round
            "counted_flops": side.get("counted_flops")}


def run_trl_grpo(args, data: Path, workdir: Path) -> dict:
    return trl_grpo_result(run_grpo_side(TRL_GRPO, args, data, workdir))


def run_variant(name: str, args, data: Path, workdir: Path) -> dict:
    runner = {TRL_PPO: run_trl_ppo, TRL_GRPO: run_trl_grpo}.get(name)
    return runner(args, data, workdir) if runner else run_ours(name, args, data, workdir)


def counted_flops(name: str, args, data: Path, workdir: Path) -> float | None:
    """The FLOPs of round COUNTED_ROUND of a separate run of `name` that ends there, counted as
    they ran (bench.flop_count on our side, its CountedRound on the peers')."""
    short = argparse.Namespace(**{**vars(args), "rounds": COUNTED_ROUND, "count_round": COUNTED_ROUND})
    return run_variant(name, short, data, workdir / "counted")["counted_flops"]


def peer_of(name: str) -> str:
    """The TRL row a variant is compared with: the peer of its own algorithm."""
    return TRL_GRPO if name in (*GRPO, TRL_GRPO) else TRL_PPO


def expected_work(name: str, args) -> dict:
    """What every round of `name` must do: its answers of exactly --answer_len tokens, one
    optimizer step of each trained model."""
    answers = args.batch * (args.samples_per_prompt if peer_of(name) == TRL_GRPO else 1)
    return {"answers": answers, "generated_tokens": answers * args.answer_len, "optimizer_steps": 1}


def check_work(results: dict, args) -> None:
    """Every row did exactly the asked work per round, so each row and its peer did the same."""
    wrong = {name: r["work"] for name, r in results.items() if r["work"] != expected_work(name, args)}
    if wrong:
        raise SystemExit("not the same work: " + "; ".join(
            f"{name} did {work} per round, not {expected_work(name, args)}" for name, work in wrong.items()))


def ratios(results: dict) -> dict:
    """Each row's samples/s over its algorithm's TRL row's (None without that row)."""
    return {name: r["samples_per_s"] / results[peer_of(name)]["samples_per_s"] if peer_of(name) in results else None
            for name, r in results.items()}


def generation_floors(args, peak: float) -> dict:
    """Each variant's generation floor in seconds (bench.peak.generation_floor_s) for its rows a
    round, on the actor's real weights."""
    from transformers import AutoModelForCausalLM

    from bench.peak import DTYPES, generation_floor_s
    from utils.model import resolve_model_path
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.actor), dtype=DTYPES[args.dtype])
    model.to(args.device)
    by_rows = {}
    for name in args.variants:
        rows = expected_work(name, args)["answers"]
        if rows not in by_rows:
            by_rows[rows] = generation_floor_s(model, rows, args.prompt_len, args.answer_len, peak)
    return {name: by_rows[expected_work(name, args)["answers"]] for name in args.variants}


def print_table(results: dict, peaks: list[float], args, floors: dict) -> None:
    peak = max(peaks)
    print(f"\nStep 3, actor {args.actor}, critic {args.critic} (PPO), {args.batch} prompts x 1 answer (PPO) or x "
          f"{args.samples_per_prompt} answers (GRPO) a round, prompt {args.prompt_len} + answer {args.answer_len} "
          f"tokens (eos off), {args.rounds} rounds (first left out), GRPO KL {args.kl_ctl} lr {args.learning_rate}, "
          f"dtype {args.dtype}, {args.device}; matmul peak {peak / 1e12:.4f} TFLOP/s (best of {len(peaks)} samples "
          f"between the rows, lowest {min(peaks) / 1e12:.4f})")
    heads = ("samples/s", "gen tok/s", "gen TFLOPs", "train TFLOPs", "TFLOPs", "gen %peak", "train %peak",
             "score %peak", "gen s", "gen floor s", "gen %floor", "score s", "train s", "peak GB", "TFLOP/sample", "vs TRL")
    print(f"{'variant':28s}" + "".join(f"{h:>13s}" for h in heads))
    for (name, r), ratio in zip(results.items(), ratios(results).values()):
        cells = [r.get(c) for c in COLUMNS[:5]]
        cells += [r[phase] * 1e12 / peak * 100 if phase in r else None
                  for phase in ("generation_tflops", "training_tflops", "scoring_tflops")]
        gen_s = r.get("generation_s")
        cells += [gen_s, floors[name], floors[name] / gen_s * 100 if gen_s else None]
        cells += [r.get(c) for c in COLUMNS[5:] if c != "generation_s"]
        counted = r.get("counted_flops")
        cells += [counted / r["work"]["answers"] / 1e12 if counted else None]
        print(f"{name:28s}" + "".join(f"{c:13.4g}" if c is not None else f"{'-':>13s}" for c in cells)
              + (f"{ratio:12.2f}x" if ratio is not None else f"{'-':>13s}"))
    if any(r.get("counted_flops") for r in results.values()):
        print(f"TFLOP/sample: round {COUNTED_ROUND} of a separate run of each row, counted as it ran (bench.flop_count: "
              "every matmul and attention call, forward and backward, generation included), over its answers")
    print(f"samples = answers; vs TRL: each row's samples/s over '{TRL_PPO}' (PPO rows) or '{TRL_GRPO}' "
          "(GRPO rows), the same run's measurement")
    print("work per round: " + "; ".join(
        f"{name} {r['work']['answers']:g} answers, {r['work']['generated_tokens']:g} generated tokens, "
        f"{r['work']['optimizer_steps']:g} optimizer step(s) per model" for name, r in results.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--actor", default="tiny-llama")
    parser.add_argument("--critic", default="tiny-llama", help="PPO's critic and reward model (GRPO has none)")
    parser.add_argument("--batch", type=int, default=8, help="prompts a round")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="GRPO: answers per prompt")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--answer_len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--kl_ctl", type=float, default=0.1, help="GRPO: KL weight, ours and TRL's beta")
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="GRPO: the actor's, ours and TRL's")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--count_flops", action=argparse.BooleanOptionalAction, default=True,
                        help="count each row's FLOPs a sample in a separate short run (TFLOP/sample)")
    parser.add_argument("--json", help="write the results here")
    parser.set_defaults(count_round=0)  # the timed runs count nothing; counted_flops' runs do
    return parser


def main() -> None:
    args = build_parser().parse_args()

    import torch

    from bench.peak import matmul_peak_flops
    from utils.model import resolve_dtype_name
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.dtype = resolve_dtype_name(args.dtype, args.device)
    # sampled before and after every row, the best kept: one sample read 0.127 TFLOP/s on a
    # machine whose training ran at 0.14 and whose matmuls read 0.174-0.193 minutes later
    peaks = [matmul_peak_flops(args.dtype, args.device)]
    with tempfile.TemporaryDirectory(prefix="step3-bench-") as tmp:
        data = Path(tmp) / "prompts.jsonl"
        write_prompt_file(data, args.actor, args.prompt_len, 2 * args.batch * args.rounds + 16)
        results = {}
        for name in args.variants:
            print(f"running {name} ...", flush=True)
            results[name] = run_variant(name, args, data, Path(tmp))
            peaks.append(matmul_peak_flops(args.dtype, args.device))
            if args.count_flops:
                results[name]["counted_flops"] = counted_flops(name, args, data, Path(tmp))
    peak = max(peaks)
    floors = generation_floors(args, peak)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "matmul_peak_flops": peak,
                                               "matmul_peak_samples": peaks, "generation_floor_s": floors,
                                               "results": results}, indent=2))
    check_work(results, args)
    print_table(results, peaks, args, floors)


if __name__ == "__main__":
    main()
