"""Learning quality on a verifiable task: does RLHF really improve the model?

Runs the pipeline with one preset of train.py: Steps 1 and 2 once (or takes --sft / --reward),
Step 3 once per --seeds value (only PPO's randomness changes: same SFT model, reward model and
data), Step 3 with the ptx loss for the first seed, and DPO from the same SFT model. Then, on
--num_prompts held-out prompts of the bundled task (its fixed test split, which no step trains
on), greedy answers of every model are scored by the task's checker (utils.data.bundled.score):
the base model, the SFT model, each seed's final actor and EMA actor, the ptx actor and the DPO
actor. Also reported: the reward model's held-out pair accuracy, each Step 3 run's reward and
KL to the reference, and the LM loss on the plain-text corpus (the ptx data) with and without ptx.
Writes quality.json, a table (quality.md) and quality_curves.png (reward, KL, losses, entropy and
the rollouts' ground-truth score against iterations, one line per seed) into --output_dir.

--task names the task family (utils.data.tasks: bundled, bundled-constraints): the data path of
every step and the held-out prompts and checker of the scoring (without it: the bundled task's
held-out prompts, and the preset's own data). Step 3's reward is a reward model (trained, or
--reward PATH), the task's checker (--reward checker) or reward functions (--reward_fn, repeatable,
with --reward_weights; no reward model). --best_of N adds rows for the SFT model: N answers
sampled per prompt, their mean ground truth (sampled pass@1), the one Step 3's reward ranks
highest (best-of-N: if it does not beat greedy SFT, Step 3 on that reward will not either) and
the best by ground truth (oracle best-of-N), each with its paired gain over greedy SFT.

    python -m bench.quality                                   # smollm2-135m, default preset
    python -m bench.quality --reward output/step2_reward      # reuse a trained reward model
    python -m bench.quality --preset quick --seeds 1 2 --num_prompts 16   # tiny models, minutes
    python -m bench.quality --reward checker --skip ptx dpo   # Step 3 rewarded by the checker itself
    python -m bench.quality --jobs 2                          # two Step 3 seeds at a time
    python -m bench.quality --reward_fn my_rewards.py:exact --best_of 8   # reward functions; best-of-8 rows
    python -m bench.quality --task bundled-constraints --reward checker --skip ptx dpo
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

from utils.config import ConfigError
from utils.metrics import read_jsonl

CURVES = ("reward", "kl", "actor_loss", "critic_loss", "entropy", "gt_score")
CHECKER = "checker"  # --reward value: Step 3 is rewarded by the task's checker, no reward model


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """One pipeline stage in a subprocess, its console kept in `log`; stop on failure."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                                   **(env or {})}).returncode
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {code}); log {log}:\n{tail}")
    print(f"  {log.stem}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def module(name: str, *flags) -> list[str]:
    return [sys.executable, "-m", name, *map(str, flags)]


def build_models(args, preset) -> dict[str, Path]:
    """Train (or reuse) every model the comparison needs; name -> folder."""
    out = args.output_dir
    sft = Path(args.sft) if args.sft else out / "step1_sft"
    if not args.sft and not (sft / "training_summary.json").is_file():
        run([sys.executable, "train.py", "--preset", args.preset, "--step", "1", "--output-dir", str(out),
             *train_data(args), "--overwrite"], out / "step1.log")
    models = {"base": Path(preset.actor_model), "sft": sft}
    if args.reward == CHECKER or args.reward_fn:  # no reward model: the critic starts from SFT
        args.reward_used = CHECKER if args.reward == CHECKER else reward_label(args)
    else:
        reward = Path(args.reward) if args.reward else out / "step2_reward"
        if not args.reward and not (reward / "training_summary.json").is_file():
            run([sys.executable, "train.py", "--preset", args.preset, "--step", "2", "--output-dir", str(out),
                 *train_data(args), "--overwrite"], out / "step2.log")
        if args.policy_pairs:
            reward = policy_reward_model(args, sft, reward)
        args.reward_used = reward
    step3 = [*data_flags(preset, args), *preset.steps[3], "--actor_model_name_or_path", sft,
             *step3_reward_flags(args, sft),
             "--actor_zero_stage", "2", "--critic_zero_stage", "2",
             *(("--max_rounds", args.rounds) if args.rounds else ()), *args.step3_args.split()]
    runs = [(f"seed{s}", ["--seed", s]) for s in args.seeds]
    if "ptx" not in args.skip:
        runs.append((f"seed{args.seeds[0]}_ptx", ["--seed", args.seeds[0],
                                                   "--unsupervised_dataset_name", args.task or "bundled"]))
    pending = []
    for name, extra in runs:
        folder = out / f"step3_{name}"
        if not (folder / "actor" / "training_summary.json").is_file():
            pending.append((module("training.step3_rlhf_finetuning.main", *step3, *extra, "--output_dir", folder,
                                   "--overwrite_output_dir", "--disable_tqdm"), out / f"step3_{name}.log"))
        models[f"ppo_{name}"] = folder / "actor"
        if name.endswith("_ptx"):
            continue
        models[f"ppo_{name}_ema"] = folder / "actor_ema"
    run_side_by_side(pending, args.jobs)
    if "dpo" in args.skip:
        return models
    dpo = out / "dpo"
    if not (dpo / "training_summary.json").is_file():
        run(module("training.step2_dpo_finetuning.main", *data_flags(preset, args), *preset.steps[2],
                   "--model_name_or_path", sft, "--learning_rate", "5e-6", "--beta", "0.1",
                   "--output_dir", dpo, "--overwrite_output_dir", "--disable_tqdm"), out / "dpo.log")
    models["dpo"] = dpo
    return models


def data_flags(preset, args) -> list[str]:
    """The preset's data flags, its --data_path replaced by --task when one is given."""
    from train import without_flag
    flags = list(preset.data)
    return without_flag(flags, "--data_path") + ["--data_path", args.task] if args.task else flags


def train_data(args) -> list[str]:
    return ["--data-path", args.task] if args.task else []


def reward_label(args) -> str:
    weights = f" (weights {' '.join(f'{w:g}' for w in args.reward_weights)})" if args.reward_weights else ""
    return "reward functions " + ", ".join(args.reward_fn) + weights


def step3_reward_flags(args, sft: Path) -> list:
    """Step 3's reward: the checker or reward functions (no reward model; the critic starts from
    SFT), else the reward model (which the critic starts from, as in DeepSpeed-Chat)."""
    if args.reward_used == CHECKER:
        return ["--reward_source", "checker", "--critic_model_name_or_path", sft]
    if args.reward_fn:
        weights = ["--reward_weights", *map(str, args.reward_weights)] if args.reward_weights else []
        return [*(x for spec in args.reward_fn for x in ("--reward_fn", spec)), *weights,
                "--critic_model_name_or_path", sft]
    return ["--critic_model_name_or_path", args.reward_used]


def run_side_by_side(pending: list[tuple[list[str], Path]], jobs: int) -> None:
    """Step 3 runs, `jobs` at a time, the CPU threads split between them (each run is its own
    one-process group, so each gets its own rendezvous port)."""
    from concurrent.futures import ThreadPoolExecutor

    from utils.cli import free_port
    jobs = max(1, min(jobs, len(pending)))
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else {}

    def start(cmd: list[str], log: Path) -> None:  # the port is picked when the run starts
        run(cmd, log, {"MASTER_PORT": str(free_port()), **threads})

    with ThreadPoolExecutor(jobs) as pool:
        for done in [pool.submit(start, cmd, log) for cmd, log in pending]:
            done.result()


def policy_reward_model(args, sft: Path, reward: Path) -> Path:
    """A second reward-model round on pairs of the SFT model's own samples ranked by the task's
    checker (training.step2_reward_model_finetuning.policy_comparisons), continuing from `reward`."""
    out = args.output_dir
    pairs, tuned = out / "policy_pairs.jsonl", out / "step2_reward_policy"
    if not pairs.is_file():
        run(module("training.step2_reward_model_finetuning.policy_comparisons", "--model_name_or_path", sft,
                   "--output_file", pairs, "--num_prompts", args.policy_pairs, "--samples_per_prompt", 6,
                   "--data_path", args.task or "bundled", "--max_new_tokens", args.max_new_tokens),
            out / "policy_pairs.log")
    if not (tuned / "training_summary.json").is_file():
        run(module("training.step2_reward_model_finetuning.main", "--model_name_or_path", reward,
                   "--data_path", pairs, "--data_split", "0,1,0", "--max_seq_len", 128,
                   "--per_device_train_batch_size", 8, "--learning_rate", "2e-5", "--num_warmup_steps", 10,
                   "--num_train_epochs", 2, "--log_interval", 10, "--output_dir", tuned,
                   "--overwrite_output_dir", "--disable_tqdm"), out / "step2_reward_policy.log")
    return tuned


def lm_loss(path: str, texts: list[str], max_len: int = 128, batch_size: int = 8) -> float:
    """Mean next-token loss of a model on `texts` (each cut to max_len tokens)."""
    import torch

    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    tokenizer = load_tokenizer(resolve_model_path(path))
    model = load_causal_lm(path, tokenizer).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_len,
                            padding=True, return_tensors="pt")
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            total += model(**enc, labels=labels).loss.item() * n
            count += n
    return total / count


def summaries(args) -> dict:
    out = args.output_dir
    rm = (json.loads((args.reward_used / "training_summary.json").read_text())
          if isinstance(args.reward_used, Path) else {})
    runs = {}
    for folder in sorted(p for p in out.glob("step3_seed*") if p.is_dir()):
        s = json.loads((folder / "actor" / "training_summary.json").read_text())
        rows = [r for r in read_jsonl(folder / "logs" / "metrics.jsonl") if "train/reward" in r]
        runs[folder.name] = {"reward_first": s.get("reward_first"), "reward_last": s.get("reward_last"),
                             "kl_last": s.get("kl_last"), "rounds": s.get("rounds"),
                             "curves": {k: [r.get(f"train/{k}") for r in rows] for k in CURVES}}
    return {"reward_model": {k: rm.get(k) for k in ("accuracy_before", "accuracy_after") if k in rm}, "step3": runs}


def paired_gain(runs: list[list[float]], sft: list[float]) -> dict:
    """The seeds' mean gain over SFT and its standard error over prompts (per prompt: the seeds'
    mean score minus SFT's), so a gain can be set against the prompt sample's noise."""
    diffs = [statistics.fmean(col) - base for *col, base in zip(*runs, sft)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return {"gain": statistics.fmean(diffs), "gain_se": se}


def verdict(kind: str, g: dict) -> str:
    seed_range = g["max"] - g["min"]
    beats = g["gain"] > seed_range and g["gain"] > 2 * g["gain_se"]
    return (f"{kind} - SFT = {g['gain']:+.3f} (standard error {g['gain_se']:.3f}, seed-to-seed range "
            f"{seed_range:.3f}): " + ("larger than both the spread and 2 SE" if beats else "NOT larger than the spread and 2 SE"))


def by_task(tasks: list[str], columns: dict[str, list[list[float]]]) -> dict[str, dict]:
    """Per task: its prompt count and each column's mean score there (a column is one or more
    models' per-prompt scores, averaged over the models), to show which tasks a gain comes from."""
    out = {}
    for task in sorted(set(tasks)):
        rows = [i for i, t in enumerate(tasks) if t == task]
        out[task] = {"n": len(rows), **{name: statistics.fmean(statistics.fmean(m[i] for m in models) for i in rows)
                                        for name, models in columns.items()}}
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def plot(step3: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a curve no run moves (the critic's loss when critic-free) gets no panel
    keys = [k for k in CURVES if any(y for r in step3.values() for y in r["curves"][k])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    axes = axes[0]
    for ax, key in zip(axes, keys):
        for name, r in step3.items():
            ys = r["curves"][key]
            if any(y is not None for y in ys):
                ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=name.replace("step3_", ""))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("PPO iteration", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["| model | ground-truth score (held-out) |", "|---|---|"]
    lines += [f"| {name} | {score:.3f} |" for name, score in result["scores"].items()]
    for key, s in result["groups"].items():
        lines.append(f"| {key}: mean over {s['n']} seeds | {s['mean']:.3f} (min {s['min']:.3f}, "
                     f"max {s['max']:.3f}, stdev {s['stdev']:.3f}; gain over SFT {s['gain']:+.3f}, "
                     f"SE {s['gain_se']:.3f}) |")
    first = next(iter(result["by_task"].values()), {})
    columns = [name for name in first if name != "n"]  # the models' columns, in by_task's order
    lines += ["", "| task | prompts | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    lines += [f"| {task} | {row['n']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |"
              for task, row in result["by_task"].items()]
    if "best_of_n" in result:
        lines += best_of_table(result["best_of_n"])
    lines += ["", "| other | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result["other"].items()]
    return "\n".join(lines)


def best_of_rows(args, family, questions: list[str], sft: str, greedy: list[float]) -> dict:
    """--best_of for the SFT model under Step 3's reward: sampled pass@1, best-of-N and oracle
    best-of-N, each with its paired gain over greedy SFT (the Step 3 rows' statistics)."""
    from inference.best_of_n import Sampling
    from inference.prompt_eval import best_of_for

    n = args.best_of
    sampling = Sampling(n=n, temperature=args.best_of_temperature, max_new_tokens=args.max_new_tokens,
                        seed=args.seeds[0])
    choices = best_of_for(sft, questions, sampling, step3_reward(args, family), family)
    per_prompt = {"sft_sampled": [c.sampled_score for c in choices],
                  f"sft_best_of_{n}": [c.best_score for c in choices],
                  f"sft_oracle_of_{n}": [c.oracle_score for c in choices]}
    labels = ("SFT sampled pass@1", f"SFT best-of-{n} under the Step 3 reward", f"SFT oracle best-of-{n}")
    rows = {label: {"score": statistics.fmean(col), **paired_gain([col], greedy)}
            for label, col in zip(labels, per_prompt.values())}
    return {"n": n, "temperature": args.best_of_temperature, "seed": args.seeds[0],
            "reward": str(args.reward_used), "rows": rows, "per_prompt": per_prompt}


def step3_reward(args, family):
    """The reward Step 3 was given, as a best-of-N ranker."""
    from inference.best_of_n import Reward
    from utils.rewards import load_reward_functions

    if args.reward_used == CHECKER:
        return Reward(checker=family)
    if args.reward_fn:
        return Reward(functions=load_reward_functions(args.reward_fn), weights=args.reward_weights)
    return Reward(model_path=str(args.reward_used))


def best_of_table(best: dict) -> list[str]:
    lines = ["", f"| SFT, {best['n']} answers sampled per prompt (T {best['temperature']:g}), Step 3 reward "
             f"{best['reward']} | ground-truth score (held-out) | gain over greedy SFT (SE) |", "|---|---|---|"]
    return lines + [f"| {label} | {r['score']:.3f} | {r['gain']:+.3f} ({r['gain_se']:.3f}) |"
                    for label, r in best["rows"].items()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="train.py preset: default or quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--sft", default="", help="use this Step 1 output instead of training one")
    parser.add_argument("--task", default="", help="task family (bundled, bundled-constraints): every step's "
                        "data path and the held-out prompts (default: bundled's prompts, the preset's data)")
    parser.add_argument("--reward", default="", help="use this reward model instead of training one; "
                        "'checker' rewards Step 3 with the task's checker (no reward model)")
    parser.add_argument("--reward_fn", action="append", default=[], metavar="SPEC",
                        help="reward Step 3 with this function (FILE.py:NAME or module:NAME; repeatable), "
                        "no reward model")
    parser.add_argument("--reward_weights", type=float, nargs="+", default=[],
                        help="one weight per --reward_fn, in order (default all 1)")
    parser.add_argument("--best_of", type=int, default=None,
                        help="also score the SFT model's best-of-N under Step 3's reward, oracle and sampled")
    parser.add_argument("--best_of_temperature", type=float, default=1.0, help="sampling temperature for --best_of")
    parser.add_argument("--rounds", type=int, default=0, help="Step 3 iterations (default: the preset's)")
    parser.add_argument("--step3_args", default="", help="more Step 3 flags, quoted (e.g. a learning rate)")
    parser.add_argument("--policy_pairs", type=int, default=0,
                        help="prompts whose sampled answers (6 each) the task's checker ranks for a second "
                        "reward-model round before Step 3 (0 = off)")
    parser.add_argument("--skip", nargs="*", choices=("ptx", "dpo"), default=[],
                        help="leave out the ptx run and/or DPO")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Step 3 runs trained side by side (CPU threads split between them)")
    parser.add_argument("--num_prompts", type=int, default=100, help="held-out prompts of the task scored")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--output_dir", type=Path, default=Path("output/quality"))
    return parser.parse_args(argv)


def check_args(args) -> None:
    """Refuse contradictory flags with one line before any training."""
    from train import PRESETS
    if args.preset not in PRESETS:
        refuse(f"unknown --preset {args.preset!r} (one of {', '.join(PRESETS)})")
    if args.jobs < 1:
        refuse(f"--jobs must be at least 1, got {args.jobs}")
    if args.reward == CHECKER and args.policy_pairs:
        refuse("--policy_pairs trains a reward model; it cannot go with --reward checker")
    if args.reward_fn and (args.reward or args.policy_pairs):
        refuse("--reward_fn rewards Step 3 without a reward model: it cannot go with --reward or --policy_pairs")
    if args.reward_weights and not args.reward_fn:
        refuse("--reward_weights weighs --reward_fn functions: give them")
    if args.best_of is not None and args.best_of < 1:
        refuse(f"--best_of must be at least 1, got {args.best_of}")
    if not args.best_of_temperature > 0:
        refuse(f"--best_of_temperature must be > 0, got {args.best_of_temperature}")
    try:
        from utils.data import tasks
        from utils.rewards import load_reward_functions, weights_for
        tasks.family(args.task or "bundled")
        weights_for([f.name for f in load_reward_functions(args.reward_fn)], args.reward_weights)
    except ConfigError as err:
        refuse(str(err))


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    from inference.prompt_eval import evaluate
    from train import PRESETS
    from utils.data import tasks

    family = tasks.family(args.task or "bundled")
    preset = PRESETS[args.preset]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    models = build_models(args, preset)

    questions = family.held_out(args.num_prompts)  # the family's fixed test split
    answers = evaluate([str(p) for p in models.values()], questions, max_new_tokens=args.max_new_tokens,
                       family=family)
    per_prompt = {name: a.scores for name, a in zip(models, answers)}
    scores = {name: a.mean_score for name, a in zip(models, answers)}
    texts = family.plain_text_corpus()[:64]  # the task family's prose (the ptx run's text)
    first = f"ppo_seed{args.seeds[0]}"
    info = summaries(args)
    other = {"reward used by Step 3": str(args.reward_used),
             "reward model's held-out accuracy (its own data's pairs)": info["reward_model"].get("accuracy_after"),
             "held-out prompts": len(questions),
             "LM loss on plain text: SFT": lm_loss(str(models["sft"]), texts),
             f"LM loss on plain text: PPO seed {args.seeds[0]}": lm_loss(str(models[first]), texts)}
    if f"{first}_ptx" in models:
        other[f"LM loss on plain text: PPO seed {args.seeds[0]} + ptx"] = lm_loss(str(models[f"{first}_ptx"]), texts)
    for name, r in info["step3"].items():
        other[f"{name}: reward first -> last, KL last"] = (
            f"{r['reward_first']:.3f} -> {r['reward_last']:.3f}, KL {r['kl_last']:.3f}")
    seeds_of = {kind: [f"ppo_seed{s}{suffix}" for s in args.seeds]
                for kind, suffix in (("PPO actor", ""), ("PPO EMA actor", "_ema"))}
    groups = {kind: {**spread([scores[n] for n in names]),
                     **paired_gain([per_prompt[n] for n in names], per_prompt["sft"])}
              for kind, names in seeds_of.items()}
    task_names = [family.task_of(q) for q in questions]
    columns = {"base": [per_prompt["base"]], "SFT": [per_prompt["sft"]],
               **{kind: [per_prompt[n] for n in names] for kind, names in seeds_of.items()}}
    result = {"preset": args.preset, "task": args.task or "bundled", "seeds": args.seeds, "scores": scores,
              "groups": groups, "other": other, "by_task": by_task(task_names, columns), "step3": info["step3"],
              "machine": f"{os.cpu_count()} CPU threads", "date": time.strftime("%Y-%m-%d %H:%M"),
              "per_prompt": {"tasks": task_names, **per_prompt}}  # to pool or re-analyse without re-scoring
    if args.best_of is not None:
        best = best_of_rows(args, family, questions, str(models["sft"]), per_prompt["sft"])
        result["per_prompt"].update(best.pop("per_prompt"))
        result["best_of_n"] = best
    result["verdict"] = "; ".join(verdict(kind, g) for kind, g in groups.items())
    (args.output_dir / "quality.json").write_text(json.dumps(result, indent=2))
    (args.output_dir / "quality.md").write_text(table(result) + "\n")
    plot(info["step3"], args.output_dir / "quality_curves.png")
    print(table(result))
    print(result["verdict"])
    print(f"written: {args.output_dir}/quality.json, quality.md, quality_curves.png")


if __name__ == "__main__":
    main()
