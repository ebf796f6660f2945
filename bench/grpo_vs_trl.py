"""GRPO side by side with TRL 1.16's GRPOTrainer: does our Step 3 gain at least as much?

From one SFT model folder and one reward function (`--reward_fn FILE.py:NAME`, the contract of
utils/rewards.py, which is TRL's reward_funcs contract), for every --seeds value:

  ours  `python -m training.step3_rlhf_finetuning.main --advantage grpo ...` (a subprocess)
  TRL   `bench.trl_grpo_peer`: TRL 1.16 `GRPOTrainer`, in a subprocess with the python of a cached
        environment that has trl 1.16 (bench.peer_env); its final policy is saved as an HF folder

then the SFT model and every final model answer the task family's held-out prompts greedily
(inference.prompt_eval), scored by the family's checker as bench.quality scores them
(--data_path bundled or bundled-constraints: utils.data.tasks). Reported:
each side's mean gain over SFT with its paired standard error over prompts (bench.quality's
paired_gain), the paired difference ours - TRL, each run's wall time and per-round time, and the
rollouts' reward per round. Written to --output_dir: grpo_vs_trl.json and grpo_vs_trl.md.

    python -m bench.grpo_vs_trl --sft /work/runs/peer-sft/step1_sft \\
        --reward_fn examples/rewards/bundled_math.py:bundled_math --seeds 1234 1235 --rounds 10 \\
        --output_dir /work/runs/grpo-vs-trl

Matched explicitly (`matched_settings`, checked by tests/test_grpo_vs_trl.py against both command
lines):
  model       the same SFT folder is policy and reference on both sides, fp32 (--dtype), dropout
              off on both (ours --actor_dropout 0, TRL disable_dropout), gradient checkpointing
              the same on both (--gradient_checkpointing; TRL's own default is on)
  prompts     Step 3's prompts from our data layer (create_prompt_dataset phase 3 with --data_path,
              --data_split, --num_examples, --max_prompt_seq_len, the seed), in the order our
              sampler draws them (DistributedSampler, seed, epoch by epoch); TRL gets the same
              prompt texts in that order with shuffle_dataset=False, so every round of both sides
              answers the same prompts. The peer checks that TRL's tokenization of each text gives
              exactly our ids (it refuses to run otherwise, e.g. on a prompt our side cut from the left)
  reward      the same function from the same spec; TRL gets it wrapped only so that it receives
              the keyword arguments it names (as utils/rewards.py passes them), with the data
              set rows' columns (the same dicts our Step 3's prompt batches carry);
              scores unclipped on both (ours --clip_reward_value 1e6)
  GRPO        num_generations = --samples_per_prompt, max_completion_length = --max_answer_seq_len,
              beta = --kl_ctl with --kl_penalty loss (a k3 KL term in the loss, as TRL's),
              scale_rewards = --scale_rewards, loss_type = --loss_aggregation (dapo<->dapo,
              sequence<->grpo, token<->bnpo, dr_grpo<->dr_grpo), epsilon = --cliprange (no
              clip-higher), num_iterations 1 = --ppo_epochs 1 (ratio 1 at every step), temperature,
              top_p 1, top_k 0, eos = the tokenizer's eos only (TRL would also stop at the model's
              generation_config eos ids: the peer sets them to the tokenizer's); with --ignore_eos
              every answer is exactly --max_answer_seq_len tokens (ours --ignore_eos, TRL
              generation_kwargs min_new_tokens)
  schedule    --prompts_per_round prompts x K answers a round, in micro-batches of --micro_batch
              answers, one optimizer step a round (gradient accumulation over the round; TRL
              steps_per_generation = gradient_accumulation_steps), --rounds rounds (TRL max_steps):
              the same number of answers seen; AdamW lr --learning_rate, betas (0.9, 0.95),
              eps 1e-8, weight decay 0, constant schedule without warmup (--lr_scheduler_type),
              max_grad_norm --max_grad_norm; seed --seed on both
Not matched (cannot be, or not worth it):
  - random streams: the same seed drives different code, so the sampled answers differ; seeds
    are the unit of comparison (report the spread, not one run)
  - --ignore_eos: ours samples eos as an ordinary token and goes on; TRL's min_new_tokens gives
    eos no probability (were it sampled, TRL would end the answer there)
  - the group std: ours divides by std + 1e-6, TRL by std + 1e-4; both give a tied group 0
  - what the reward function sees as `prompts`: TRL the raw prompt text, ours the prompt decoded
    from its ids (TRL's own extras, completion_ids, trainer_state, log_extra, log_metric, are
    not passed on: the function gets what utils/rewards.py gives it)
  - the engines: ours runs DeepSpeed (ZeRO stage --zero_stage) with its hybrid engine for
    generation; TRL runs accelerate + HF generate. Wall times compare toolkits, not algorithms
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.flop_count import COUNTED_FLOPS, counted_module
from utils.metrics import read_jsonl

# ours --loss_aggregation -> TRL loss_type (the same per-token loss normalisation)
LOSS_TYPES = {"dapo": "dapo", "sequence": "grpo", "token": "bnpo", "dr_grpo": "dr_grpo"}
ADAM_BETAS = (0.9, 0.95)  # ours (utils/strategy/optim.py); TRL is told the same
ADAM_EPS = 1e-8
NO_CLIP = 1e6  # ours clips scores to +-clip_reward_value; TRL does not clip
STEP3 = "training.step3_rlhf_finetuning.main"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", required=True, help="the SFT model folder (or a built-in name like tiny-llama)")
    p.add_argument("--reward_fn", required=True, help="FILE.py:NAME or package.module:NAME")
    p.add_argument("--data_path", default="bundled", help="the task family's prompts (Step 3's --data_path)")
    p.add_argument("--data_split", default="2,4,4")
    p.add_argument("--num_examples", type=int, default=0, help="cap on the family's rows (0 = all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    p.add_argument("--peer_seeds", type=int, nargs="+", default=None,
                   help="TRL's seeds when fewer than ours (e.g. 4 seeds ours, 2 TRL); default --seeds")
    p.add_argument("--rounds", type=int, default=10, help="rollout rounds = optimizer steps, each side")
    p.add_argument("--prompts_per_round", type=int, default=8)
    p.add_argument("--samples_per_prompt", type=int, default=4, help="answers per prompt (TRL num_generations)")
    p.add_argument("--micro_batch", type=int, default=0,
                   help="answers per micro-batch (0 = the whole round); one optimizer step a round")
    p.add_argument("--max_prompt_seq_len", type=int, default=128)
    p.add_argument("--max_answer_seq_len", type=int, default=32, help="TRL max_completion_length")
    p.add_argument("--ignore_eos", action="store_true",
                   help="every answer exactly --max_answer_seq_len tokens on both sides (throughput benchmarks)")
    p.add_argument("--kl_ctl", type=float, default=0.04, help="KL weight (TRL beta)")
    p.add_argument("--learning_rate", type=float, default=5e-6)
    p.add_argument("--lr_scheduler_type", default="constant")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cliprange", type=float, default=0.2, help="TRL epsilon")
    p.add_argument("--scale_rewards", default="group", choices=("group", "batch", "none"))
    p.add_argument("--loss_aggregation", default="dapo", choices=tuple(LOSS_TYPES),
                   help="ours; TRL gets the same normalisation as loss_type (its default is dapo)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="on both sides (default off on both)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides train")
    p.add_argument("--zero_stage", type=int, default=0, help="ours only: the actor's ZeRO stage")
    p.add_argument("--ours_args", default="", help="more Step 3 flags for our side, quoted (unmatched!)")
    p.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=("ours", "trl"))
    p.add_argument("--num_prompts", type=int, default=100, help="held-out prompts scored")
    p.add_argument("--max_new_tokens", type=int, default=0, help="held-out answer length (0 = --max_answer_seq_len)")
    p.add_argument("--peer_python", default="", help="a python with trl 1.16 (default: bench.peer_env's)")
    p.add_argument("--overwrite", action="store_true", help="rerun sides whose results are already there")
    p.add_argument("--count_round", type=int, default=0,
                   help="count this round's FLOPs on each side (bench.flop_count; it slows that round)")
    p.add_argument("--output_dir", type=Path, default=Path("output/grpo_vs_trl"))
    return p


# ----------------------------------------------------------------------------- matching

def micro_and_accumulation(args) -> tuple[int, int]:
    """(answers per micro-batch, micro-batches per optimizer step): one step per round."""
    answers = args.prompts_per_round * args.samples_per_prompt
    micro = args.micro_batch or answers
    if answers % micro:
        raise SystemExit(f"--micro_batch {micro} must divide the round's {answers} answers")
    return micro, answers // micro


def matched_settings(args) -> dict:
    """Every quantity both sides are given, under one name; the two command lines come from it."""
    micro, accumulation = micro_and_accumulation(args)
    return {"model": str(args.sft), "dtype": args.dtype, "device": args.device, "prompts_per_round": args.prompts_per_round,
            "samples_per_prompt": args.samples_per_prompt,
            "answers_per_round": args.prompts_per_round * args.samples_per_prompt,
            "micro_batch": micro, "gradient_accumulation_steps": accumulation, "optimizer_steps_per_round": 1,
            "rounds": args.rounds, "answers_seen": args.rounds * args.prompts_per_round * args.samples_per_prompt,
            "max_answer_seq_len": args.max_answer_seq_len, "ignore_eos": bool(args.ignore_eos),
            "kl_ctl": args.kl_ctl, "kl_in_loss": True,
            "learning_rate": args.learning_rate, "lr_scheduler_type": args.lr_scheduler_type, "warmup_steps": 0,
            "adam_betas": list(ADAM_BETAS), "adam_eps": ADAM_EPS, "weight_decay": 0.0,
            "max_grad_norm": args.max_grad_norm, "temperature": args.temperature, "top_p": 1.0, "top_k": 0,
            "cliprange": args.cliprange, "scale_rewards": args.scale_rewards,
            "loss_aggregation": args.loss_aggregation, "ppo_epochs": 1, "dropout": 0.0,
            "gradient_checkpointing": bool(args.gradient_checkpointing), "reward_fn": args.reward_fn,
            "data_path": args.data_path, "data_split": args.data_split, "num_examples": args.num_examples,
            "max_prompt_seq_len": args.max_prompt_seq_len}


def ours_command(args, seed: int, out: Path) -> list[str]:
    """Our Step 3's flags (without the python -m prefix) for one seed."""
    m = matched_settings(args)
    flags = ["--actor_model_name_or_path", m["model"], "--critic_model_name_or_path", m["model"],
             "--reward_fn", m["reward_fn"],
             "--data_path", m["data_path"], "--data_split", m["data_split"], "--num_examples", m["num_examples"],
             "--data_output_path", args.output_dir / "data",
             "--advantage", "grpo", "--samples_per_prompt", m["samples_per_prompt"],
             "--kl_ctl", m["kl_ctl"], "--kl_penalty", "loss", "--scale_rewards", m["scale_rewards"],
             "--loss_aggregation", m["loss_aggregation"], "--cliprange", m["cliprange"],
             "--clip_reward_value", NO_CLIP, "--ppo_epochs", m["ppo_epochs"], "--generation_batches", 1,
             "--num_train_epochs", m["rounds"],  # enough passes over the prompts; --max_rounds stops
             "--per_device_generation_batch_size", m["prompts_per_round"],
             "--per_device_training_batch_size", m["micro_batch"],
             "--gradient_accumulation_steps", m["gradient_accumulation_steps"],
             "--max_prompt_seq_len", m["max_prompt_seq_len"], "--max_answer_seq_len", m["max_answer_seq_len"],
             *(["--ignore_eos"] if m["ignore_eos"] else []),
             "--temperature", m["temperature"], "--top_p", m["top_p"], "--top_k", m["top_k"],
             "--actor_learning_rate", m["learning_rate"], "--lr_scheduler_type", m["lr_scheduler_type"],
             "--num_warmup_steps", m["warmup_steps"], "--actor_weight_decay", m["weight_decay"],
             "--max_grad_norm", m["max_grad_norm"], "--actor_dropout", m["dropout"],
             *(["--actor_gradient_checkpointing"] if m["gradient_checkpointing"] else []),
             "--actor_zero_stage", args.zero_stage, "--max_rounds", m["rounds"], "--dtype", m["dtype"],
             "--seed", seed, "--output_dir", out, "--disable_tqdm", "--log_interval", 1,
             *args.ours_args.split()]
    return [str(f) for f in flags]


def trl_config_kwargs(m: dict, seed: int, output_dir: str, use_cpu: bool) -> dict:
    """TRL GRPOConfig's keyword arguments from `matched_settings` (pure: testable without trl)."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=m["micro_batch"],
        gradient_accumulation_steps=m["gradient_accumulation_steps"],
        steps_per_generation=m["gradient_accumulation_steps"], num_generations=m["samples_per_prompt"],
        max_completion_length=m["max_answer_seq_len"], num_iterations=m["ppo_epochs"], max_steps=m["rounds"],
        beta=m["kl_ctl"], epsilon=m["cliprange"], epsilon_high=m["cliprange"], scale_rewards=m["scale_rewards"],
        loss_type=LOSS_TYPES[m["loss_aggregation"]], mask_truncated_completions=False,
        temperature=m["temperature"], top_p=m["top_p"], top_k=m["top_k"],
        # eos masked out of sampling until max_completion_length: no answer ends early
        generation_kwargs={"min_new_tokens": m["max_answer_seq_len"]} if m["ignore_eos"] else None,
        learning_rate=m["learning_rate"], lr_scheduler_type=m["lr_scheduler_type"], warmup_steps=m["warmup_steps"],
        adam_beta1=m["adam_betas"][0], adam_beta2=m["adam_betas"][1], adam_epsilon=m["adam_eps"],
        weight_decay=m["weight_decay"], max_grad_norm=m["max_grad_norm"], optim="adamw_torch",
        gradient_checkpointing=m["gradient_checkpointing"], disable_dropout=True,
        bf16=m["dtype"] == "bf16", fp16=False, use_cpu=use_cpu, seed=seed, data_seed=seed,
        shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, log_completions=False)


def trl_command(args, seed: int, out: Path) -> list[str]:
    """The peer's flags (without the python -m prefix) for one seed: the matched settings as JSON."""
    return ["--settings", json.dumps(matched_settings(args)), "--seed", str(seed), "--output_dir", str(out),
            "--data_output_path", str(args.output_dir / "data")]


# ----------------------------------------------------------------------------- our side

def run_logged(cmd: list[str], log: Path, device: str) -> float:
    """Run one side; its console in `log`; wall seconds. Stops the benchmark on failure."""
    from bench.child import child_env
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env={**child_env(device), "PYTHONUNBUFFERED": "1"}).returncode
    wall = time.perf_counter() - start
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {code}); log {log}:\n{tail}")
    return wall


# settings added after runs were saved, with the value those runs had
LATER_SETTINGS = {"ignore_eos": False}


def earlier_run(done: Path, args, seed: int) -> dict | None:
    """A side's saved result from an earlier call with the same settings and seed (not --overwrite)."""
    if args.overwrite or not done.is_file():
        return None
    side = json.loads(done.read_text())
    saved = {**LATER_SETTINGS, **side.get("settings", {})}
    # a counted round runs slower and a side counted at no round has no count: rerun either way
    same_count = side.get("count_round", 0) == args.count_round
    return side if saved == {**matched_settings(args), "seed": seed} and same_count else None


def run_ours(args, seed: int) -> dict:
    out = args.output_dir / f"ours_seed{seed}"
    done = out / "side.json"
    if (side := earlier_run(done, args, seed)) is not None:
        return side
    flags = [*ours_command(args, seed, out), "--overwrite_output_dir"]
    counted = out / COUNTED_FLOPS
    cmd = [sys.executable, "-m", *counted_module(counted, args.count_round), STEP3, *flags]
    print(f"ours, seed {seed} ...", flush=True)
    wall = run_logged(cmd, args.output_dir / f"ours_seed{seed}.log", args.device)
    rows = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "train/reward" in r]
    if len(rows) != args.rounds:
        raise SystemExit(f"our Step 3 ran {len(rows)} rounds, not {args.rounds}: see {out}")
    side = {"model": str(out / "actor"), "wall_s": wall, "command": cmd,
            "settings": {**matched_settings(args), "seed": seed},
            "round_s": [r["train/round_s"] for r in rows], "reward": [r["train/reward"] for r in rows],
            "kl": [r.get("train/kl") for r in rows],
            "count_round": args.count_round,
            "counted_flops": json.loads(counted.read_text())["flops"] if args.count_round else None}
    done.write_text(json.dumps(side, indent=2))
    return side


def run_trl(args, seed: int) -> dict:
    out = args.output_dir / f"trl_seed{seed}"
    done = out / "side.json"
    if (side := earlier_run(done, args, seed)) is not None:
        return side
    if not args.peer_python:
        from bench.peer_env import trl_python
        args.peer_python = trl_python("1.16")
    cmd = [args.peer_python, "-m", "bench.trl_grpo_peer", *trl_command(args, seed, out),
           "--count_round", str(args.count_round)]
    print(f"TRL, seed {seed} ...", flush=True)
    wall = run_logged(cmd, args.output_dir / f"trl_seed{seed}.log", args.device)
    side = {**json.loads((out / "peer_result.json").read_text()), "wall_s": wall, "command": cmd,
            "settings": {**matched_settings(args), "seed": seed}, "count_round": args.count_round}
    done.write_text(json.dumps(side, indent=2))
    return side


# ----------------------------------------------------------------------------- held-out scoring

def held_out(args):
    """The task family's fixed test split (no step trains on it) and its checker
    (utils.data.tasks): the ground truth both sides are judged by, whatever their reward."""
    from utils.data import tasks
    family = tasks.family(args.data_path)
    questions = family.held_out(args.num_prompts)
    return questions, lambda answers: family.score_batch(questions, answers)


# ----------------------------------------------------------------------------- report

def side_summary(sides: list[dict], per_prompt: list[list[float]], sft: list[float]) -> dict:
    from bench.quality import paired_gain, spread
    timed = [s["round_s"][1:] or s["round_s"] for s in sides]  # the first round builds things
    return {**spread([statistics.fmean(p) for p in per_prompt]), **paired_gain(per_prompt, sft),
            "wall_s": [s["wall_s"] for s in sides], "round_s_mean": [statistics.fmean(t) for t in timed],
            "reward_first": [s["reward"][0] for s in sides], "reward_last": [s["reward"][-1] for s in sides]}


def paired_difference(ours: list[list[float]], trl: list[list[float]]) -> dict:
    """Per prompt: ours' seeds' mean minus TRL's seeds' mean; mean and standard error."""
    diffs = [statistics.fmean(a) - statistics.fmean(b) for a, b in zip(zip(*ours), zip(*trl))]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return {"difference": statistics.fmean(diffs), "difference_se": se}


def table(result: dict) -> str:
    m = result["matched"]
    lines = [f"GRPO, ours vs TRL {result.get('trl_version') or '1.16'}: {m['model']}, reward {m['reward_fn']}, "
             f"{m['rounds']} rounds x {m['prompts_per_round']} prompts x {m['samples_per_prompt']} answers "
             f"({m['answers_seen']} answers seen), answers <= {m['max_answer_seq_len']} tokens, KL {m['kl_ctl']}, "
             f"lr {m['learning_rate']}, loss {m['loss_aggregation']}, {m['dtype']}; held-out prompts "
             f"{result['held_out_prompts']}", "",
             "| model | held-out score | gain over SFT (SE) | seeds | wall s per run | s per round (after the 1st) "
             "| rollout reward first -> last |", "|---|---|---|---|---|---|---|",
             f"| SFT | {result['sft_score']:.3f} | | | | | |"]
    for name, s in result["sides"].items():
        lines.append(f"| {name} | {s['mean']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}) | {s['gain']:+.3f} "
                     f"({s['gain_se']:.3f}) | {s['n']} | " + ", ".join(f"{w:.0f}" for w in s["wall_s"]) + " | "
                     + ", ".join(f"{r:.1f}" for r in s["round_s_mean"]) + " | "
                     + ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(s["reward_first"], s["reward_last"])) + " |")
    if "ours_minus_trl" in result:
        d = result["ours_minus_trl"]
        lines += ["", f"ours - TRL (paired over prompts): {d['difference']:+.3f} (SE {d['difference_se']:.3f}); "
                      f"{result['verdict']}"]
    return "\n".join(lines)


def side_seeds(args, side: str) -> list[int]:
    """The seeds a side runs: --seeds, or --peer_seeds for TRL when given."""
    return list(args.peer_seeds) if side == "trl" and args.peer_seeds else list(args.seeds)


def compare(args) -> dict:
    from inference.prompt_eval import evaluate
    args.output_dir.mkdir(parents=True, exist_ok=True)
    sides, seeds = {}, {side: side_seeds(args, side) for side in args.sides}
    for seed in dict.fromkeys([*args.seeds, *(args.peer_seeds or [])]):  # alternate the sides, so a
        for side in args.sides:                                            # machine that slows hits both
            if seed in seeds[side]:
                sides.setdefault(side, []).append(run_ours(args, seed) if side == "ours" else run_trl(args, seed))
    questions, score = held_out(args)
    models = {"sft": args.sft, **{f"{side}_seed{s}": r["model"] for side, runs in sides.items()
                                  for s, r in zip(seeds[side], runs)}}
    print(f"scoring {len(models)} models on {len(questions)} held-out prompts ...", flush=True)
    answers = evaluate(list(map(str, models.values())), questions, prompt_format="human_assistant",
                       max_new_tokens=args.max_new_tokens or args.max_answer_seq_len)
    per_prompt = {name: score(a.answers) for name, a in zip(models, answers)}
    result = {"matched": matched_settings(args), "seeds": seeds, "held_out_prompts": len(questions),
              "sft_score": statistics.fmean(per_prompt["sft"]),
              "sides": {side: side_summary(runs, [per_prompt[f"{side}_seed{s}"] for s in seeds[side]],
                                           per_prompt["sft"]) for side, runs in sides.items()},
              "trl_version": next((r.get("trl_version") for r in sides.get("trl", [])), None),
              "runs": sides, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPU threads",
              "per_prompt": per_prompt}
    if {"ours", "trl"} <= set(sides):
        d = paired_difference([per_prompt[f"ours_seed{s}"] for s in seeds["ours"]],
                              [per_prompt[f"trl_seed{s}"] for s in seeds["trl"]])
        result["ours_minus_trl"] = d
        at_least = result["sides"]["ours"]["gain"] >= result["sides"]["trl"]["gain"]
        result["verdict"] = (("our gain is at least TRL's" if at_least else "our gain is BELOW TRL's")
                             + (" (within 2 SE of no difference)" if abs(d["difference"]) <= 2 * d["difference_se"]
                                else " (more than 2 SE apart)"))
    (args.output_dir / "grpo_vs_trl.json").write_text(json.dumps(result, indent=2, default=str))
    (args.output_dir / "grpo_vs_trl.md").write_text(table(result) + "\n")
    return result


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    micro_and_accumulation(args)
    result = compare(args)
    print(table(result))
    print(f"written: {args.output_dir}/grpo_vs_trl.json, grpo_vs_trl.md")


if __name__ == "__main__":
    main()
