"""One launcher for the InstructGPT pipeline: Step 1 (supervised fine-tuning), Step 2 (reward
model) and Step 3 (PPO), each started through the deepspeed launcher, each step's output passed on.

    python train.py                                  # the demo: smollm2-135m, bundled data, CPU-sized
    python train.py --preset quick                   # tiny random models, about 2 minutes
    python train.py --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m --num-gpus 8
                                                     # a named model: DeepSpeed-Chat's recipe
    python train.py --preset deepspeed-chat --data-path Dahoas/rm-static   # its recipe, other data
    python train.py --step 3                         # Step 3 on the Step 1/2 outputs in --output-dir
    python train.py --hostfile hosts --num-gpus 8    # several machines (a DeepSpeed hostfile;
                                                     # the launcher reaches them by passwordless ssh)

On a machine without GPUs, --num-gpus N starts N CPU processes (gloo).
Outputs: <output-dir>/step1_sft, step2_reward, step3_rlhf/{actor,actor_ema,critic}; each finished
step keeps its console log in <its folder>/logs/console.log.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils.cli import free_port
from utils.config import CHAT_TEMPLATE_MODES, ArgumentParser, ConfigError, parse_config


@dataclass(frozen=True)
class Preset:
    actor_model: str
    data: tuple[str, ...]  # data flags all steps share: the same split keeps their shares disjoint
    steps: dict  # step number -> that step's flags (later flags win: a step may set its own data)
    reward_model: str = ""  # Step 2's starting model when the actor is the preset's too ("" = Step 1's output)


# "default" is sized to finish all three steps in under 20 minutes on a 2-core CPU with the
# real pretrained SmolLM2-135M; "quick" uses tiny random models and is what the tests run;
# "deepspeed-chat" is DeepSpeed-Chat's own recipe (its single_node OPT-1.3B/350M scripts), the
# default as soon as --actor-model names a model.
DS_CHAT_BLEND = ("Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
                 "yitingxie/rlhf-reward-datasets")
PRESETS = {
    "default": Preset(
        actor_model="smollm2-135m",
        data=("--data_path", "bundled", "--num_examples", "3000", "--data_split", "2,4,4"),
        steps={
            1: ("--max_seq_len", "128", "--per_device_train_batch_size", "8", "--learning_rate", "5e-5",
                "--lr_scheduler_type", "cosine", "--num_warmup_steps", "5", "--max_steps", "60",
                "--log_interval", "5"),
            2: ("--max_seq_len", "128", "--per_device_train_batch_size", "8", "--learning_rate", "5e-5",
                "--lr_scheduler_type", "cosine", "--num_warmup_steps", "5", "--max_steps", "40",
                "--log_interval", "5"),
            # fp32 even where bf16 is fast: RL steps this small barely move bf16 weights (README, dtype)
            3: ("--max_prompt_seq_len", "64", "--max_answer_seq_len", "32",
                "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "8",
                "--actor_learning_rate", "5e-6", "--critic_learning_rate", "1e-5", "--num_warmup_steps", "2",
                "--max_rounds", "10", "--enable_ema", "--dtype", "fp32", "--log_interval", "2"),
        }),
    "quick": Preset(
        actor_model="tiny-llama",
        data=("--data_path", "bundled", "--num_examples", "600", "--data_split", "2,4,4"),
        steps={
            1: ("--max_seq_len", "96", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                "--dtype", "fp32", "--log_interval", "5"),
            2: ("--max_seq_len", "96", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                "--dtype", "fp32", "--max_steps", "10", "--log_interval", "5"),
            3: ("--max_prompt_seq_len", "64", "--max_answer_seq_len", "16",
                "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
                "--num_warmup_steps", "0", "--max_rounds", "4", "--enable_ema", "--dtype", "fp32",
                "--log_interval", "1"),
        }),
    # Upstream's training_scripts/opt/single_node/run_1.3b.sh (Step 1), run_350m.sh (Step 2) and
    # run_1.3b.sh (Step 3, prompts from Dahoas/rm-static only); one epoch per step (upstream's
    # single-node Step 1 script runs 16: --step1-args "--num_train_epochs 16"); bf16 on GPUs that
    # run it (--dtype auto) where upstream used fp16.
    "deepspeed-chat": Preset(
        actor_model="facebook/opt-1.3b",
        reward_model="facebook/opt-350m",
        data=("--data_path", *DS_CHAT_BLEND, "--data_split", "2,4,4", "--seed", "1234"),
        steps={
            1: ("--max_seq_len", "512", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
                "--learning_rate", "9.65e-6", "--weight_decay", "0", "--num_train_epochs", "1",
                "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0",
                "--dtype", "auto"),
            2: ("--max_seq_len", "512", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                "--learning_rate", "5e-5", "--weight_decay", "0.1", "--num_train_epochs", "1", "--dropout", "0",
                "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0",
                "--dtype", "auto"),
            3: ("--data_path", "Dahoas/rm-static",
                "--max_prompt_seq_len", "256", "--max_answer_seq_len", "256",
                "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
                "--generation_batches", "1", "--ppo_epochs", "1", "--num_train_epochs", "1",
                "--actor_learning_rate", "9.65e-6", "--critic_learning_rate", "5e-6",
                "--actor_weight_decay", "0", "--critic_weight_decay", "0", "--lr_scheduler_type", "cosine",
                "--num_warmup_steps", "100", "--gradient_accumulation_steps", "1", "--actor_dropout", "0",
                "--enable_hybrid_engine", "--enable_ema", "--dtype", "auto"),
        }),
}
DEFAULT_PRESET, MODEL_PRESET = "default", "deepspeed-chat"  # without / with --actor-model


@dataclass(frozen=True)
class Step:
    number: int
    folder: str
    module: str
    config: str  # the step's config class, to check its flags before anything runs
    model: str  # where its model lands inside the folder
    headline: tuple[str, str, str]  # (metric, before-suffix, after-suffix) for the summary line

    def done(self, root: Path) -> bool:
        return (root / self.folder / self.model / "training_summary.json").is_file()


STEPS = {
    1: Step(1, "step1_sft", "training.step1_supervised_finetuning.main", "SFTConfig", "",
            ("perplexity", "_before", "_after")),
    2: Step(2, "step2_reward", "training.step2_reward_model_finetuning.main", "RewardConfig", "",
            ("accuracy", "_before", "_after")),
    3: Step(3, "step3_rlhf", "training.step3_rlhf_finetuning.main", "Step3Config", "actor",
            ("reward", "_first", "_last")),
}
# Set by train.py itself: passing them through a step's flags would break the chaining.
RESERVED = ("--output_dir", "--model_name_or_path", "--actor_model_name_or_path",
            "--critic_model_name_or_path", "--zero_stage", "--actor_zero_stage", "--critic_zero_stage")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, nargs="+", default=None,
                        help="steps to run, in order (default 1 2 3; 1 3 with --reward-fn)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the recipe: default: smollm2-135m on the bundled task (~20 min on 2 CPU cores); "
                        "quick: tiny random models (~2 min); deepspeed-chat: DeepSpeed-Chat's own (its data "
                        "blend, 512-token SFT, 256+256-token PPO, its learning rates and batch sizes). "
                        f"Default: {MODEL_PRESET} when --actor-model is given, else {DEFAULT_PRESET}")
    parser.add_argument("--actor-model", default=None, help="Step 1's starting model (default: the preset's)")
    parser.add_argument("--reward-model", default=None,
                        help="Step 2's starting model (default: Step 1's output, so actor and reward model "
                        "share a tokenizer); with --step 3 alone, the trained reward model to use")
    parser.add_argument("--reward-fn", nargs="+", default=[], metavar="SPEC",
                        help="Step 3's reward: Python functions (FILE.py:NAME or package.module:NAME, "
                        "Step 3's --reward_fn) instead of a reward model; with --reward-model or Step 2, both")
    parser.add_argument("--actor-zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--reward-zero-stage", type=int, default=2, choices=(0, 1, 2, 3),
                        help="ZeRO stage of Step 2 and of Step 3's critic")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="processes per machine: one per GPU, or N CPU processes on a machine "
                        "without GPUs (default 1; with --hostfile, the hostfile's slots)")
    parser.add_argument("--deployment-type", choices=("single_gpu", "single_node", "multi_node"),
                        default=None, help="inferred when not given: multi_node with --hostfile, "
                        "single_node with --num-gpus > 1, else single_gpu")
    parser.add_argument("--hostfile", default=None,
                        help="DeepSpeed hostfile ('host slots=N' per line) for runs on several machines")
    parser.add_argument("--launcher-args", default="",
                        help="extra flags for the deepspeed launcher, quoted (e.g. \"--master_addr 10.0.0.1 "
                        "--ssh_port 2222\" with --hostfile)")
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="data of all steps (replaces the preset's --data_path in each step): hub names, "
                        "local files or folders, 'bundled'")
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATE_MODES, default=None,
                        help="how every step renders conversational rows (its --chat_template): auto = the "
                        "tokenizer's chat template when it has one, none = ' Human: ... Assistant:' text")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --output-dir")
    parser.add_argument("--resume", action="store_true",
                        help="skip the steps already finished in --output-dir and run the rest "
                        "(an unfinished step starts over)")
    for n in STEPS:
        parser.add_argument(f"--step{n}-args", default="", help=f"extra flags for Step {n}, quoted")
    args = parser.parse_args(argv)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    if args.step is None:  # reward functions need no reward model: no Step 2 unless asked
        args.step = [1, 3] if args.reward_fn else [1, 2, 3]
    for step in args.step:
        if step not in STEPS:
            raise ConfigError(f"--step {step} does not exist (steps: {', '.join(map(str, STEPS))})")
    if args.step != sorted(set(args.step)):
        raise ConfigError(f"--step {' '.join(map(str, args.step))}: list each step once, in order")
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other: pick one")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise ConfigError("--num-gpus must be at least 1")
    if args.hostfile and not Path(args.hostfile).is_file():
        raise ConfigError(f"--hostfile {args.hostfile} does not exist")
    kind = args.deployment_type or ("multi_node" if args.hostfile else
                                    "single_node" if (args.num_gpus or 1) > 1 else "single_gpu")
    if kind == "single_gpu" and (args.num_gpus or 1) != 1:
        raise ConfigError(f"--deployment-type single_gpu runs one process, not --num-gpus {args.num_gpus}")
    if kind == "multi_node" and not args.hostfile:
        raise ConfigError("--deployment-type multi_node needs --hostfile (the machines and their slots)")
    if args.hostfile and kind != "multi_node":
        raise ConfigError(f"--hostfile is for multi_node runs, not --deployment-type {kind}")
    args.deployment_type = kind
    if args.preset is None:  # a user's own model gets a real recipe, not the CPU demo's 60 steps
        args.preset = MODEL_PRESET if args.actor_model else DEFAULT_PRESET
        args.preset_reason = "--actor-model given" if args.actor_model else "no --actor-model"
    else:
        args.preset_reason = "--preset"


@dataclass
class Plan:
    """What runs, from which models, into which folders."""
    root: Path
    run: list[int]  # steps to run (finished ones dropped under --resume)
    sft: str  # the actor Steps 2/3 start from: Step 1's output, or the actor model without Step 1
    models: dict  # step number -> {flag: model path}

    def folder(self, step: int) -> Path:
        return self.root / STEPS[step].folder


def make_plan(args: argparse.Namespace) -> Plan:
    root = Path(args.output_dir)
    run = [s for s in args.step if not (args.resume and STEPS[s].done(root))]
    available = lambda s: s in run or STEPS[s].done(root)  # noqa: E731  (runs now or ran before)
    preset = PRESETS[args.preset]
    actor = args.actor_model or preset.actor_model
    sft = str(root / STEPS[1].folder) if available(1) else actor
    # the preset's reward model fits the preset's actor only (their tokenizers must match)
    reward_start = args.reward_model or (preset.reward_model if not args.actor_model else "") or sft
    models = {1: {"--model_name_or_path": actor},
              2: {"--model_name_or_path": reward_start}}
    if 3 in run:
        models[3] = step3_models(args, root, sft, available(2))
    return Plan(root, run, sft, models)


def step3_models(args: argparse.Namespace, root: Path, sft: str, step2_done: bool) -> dict:
    """Step 3's model flags: the reward model (Step 2's output or --reward-model) starts the
    critic; with reward functions the critic starts from the SFT model and a reward model, when
    there is one, joins them as a reward."""
    reward = str(root / STEPS[2].folder) if step2_done else args.reward_model
    if uses_reward_fn(args):
        return {"--actor_model_name_or_path": sft, "--critic_model_name_or_path": sft,
                **({"--reward_model_name_or_path": reward} if reward else {})}
    if not reward:
        raise ConfigError("Step 3 needs a trained reward model: run Step 2 too (--step 2 3), pass "
                          f"--reward-model or --reward-fn; {root / STEPS[2].folder} holds none")
    return {"--actor_model_name_or_path": sft, "--critic_model_name_or_path": reward}


def uses_reward_fn(args: argparse.Namespace) -> bool:
    return bool(args.reward_fn) or any(flag.split("=")[0] in ("--reward_fn", "--reward-fn")
                                       for flag in shlex.split(args.step3_args))


def check_outputs(args: argparse.Namespace, plan: Plan) -> None:
    """Refuse, before any work, to write over another run's outputs unless asked to."""
    for step in plan.run:
        folder = plan.folder(step)
        if folder.exists() and any(folder.iterdir()) and not (args.overwrite or args.resume):
            raise ConfigError(f"{folder} already holds a run; pass --overwrite to replace it, --resume to "
                              "continue it, or choose another --output-dir")


def check_tokenizers(args: argparse.Namespace, plan: Plan) -> None:
    """Actor and reward model exchange token ids in Step 3: compare them before Step 1 starts."""
    if not {2, 3} & set(plan.run):
        return
    actor_model = args.actor_model or PRESETS[args.preset].actor_model

    def source(path: str) -> str:  # Step 1's output keeps its starting model's tokenizer
        return actor_model if path == str(plan.folder(1)) and 1 in plan.run else path

    actor = source(plan.models[1]["--model_name_or_path"] if 1 in plan.run else plan.sft)
    reward = source(plan.models[3]["--critic_model_name_or_path"] if 2 not in plan.run
                    else plan.models[2]["--model_name_or_path"])
    if actor == reward:
        return
    from utils.model import load_tokenizer, require_same_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(actor), trust_remote_code=False)
    require_same_tokenizer(tokenizer, resolve_model_path(reward), "reward model", f"the actor ({actor})")


def step_flags(step: int, args: argparse.Namespace, plan: Plan) -> list[str]:
    preset = PRESETS[args.preset]
    user = shlex.split(getattr(args, f"step{step}_args"))
    for flag in user:
        if flag.startswith("--") and "--" + flag[2:].split("=")[0].replace("-", "_") in RESERVED:
            raise ConfigError(f"--step{step}-args: {flag} is set by train.py (use --actor-model, --reward-model, "
                              "--actor-zero-stage, --reward-zero-stage or --output-dir)")
    zero = ({"--zero_stage": args.actor_zero_stage} if step == 1 else
            {"--zero_stage": args.reward_zero_stage} if step == 2 else
            {"--actor_zero_stage": args.actor_zero_stage, "--critic_zero_stage": args.reward_zero_stage})
    data = list(preset.data)
    for name in preset.steps[step]:  # a step's own data flag replaces the shared one
        if name.startswith("--"):
            data = without_flag(data, name)
    flags = [*data, *preset.steps[step]]
    if args.data_path:
        flags = without_flag(flags, "--data_path") + ["--data_path", *args.data_path]
    if args.chat_template:  # one rendering for all steps: Step 3 prompts as Step 1 trained the actor
        flags = without_flag(flags, "--chat_template") + ["--chat_template", args.chat_template]
    for name, value in {**plan.models[step], **zero, "--output_dir": plan.folder(step)}.items():
        flags += [name, str(value)]
    if args.resume and plan.folder(step).exists():
        flags.append("--resume")  # from the step's newest checkpoint (--stepN-args "--save_steps N")
    elif args.overwrite:
        flags.append("--overwrite_output_dir")
    if step == 3 and args.reward_fn:
        flags += ["--reward_fn", *args.reward_fn]
    return flags + user


def without_flag(flags: list[str], name: str) -> list[str]:
    """`flags` less every `name` and the values that follow it."""
    out, skipping = [], False
    for flag in flags:
        if flag.startswith("--"):
            skipping = flag == name
        if not skipping:
            out.append(flag)
    return out


def check_step_flags(step: int, flags: list[str]) -> None:
    """Parse the flags with the step's own config, so a typo stops the pipeline before Step 1."""
    import importlib

    config_cls = getattr(importlib.import_module(STEPS[step].module), STEPS[step].config)
    try:
        parse_config(config_cls, flags, exit_on_error=False, warn=False)  # the step warns itself
    except ConfigError as err:
        raise ConfigError(f"Step {step} flags: {err}") from None


def launcher_command(step: int, args: argparse.Namespace, flags: list[str]) -> list[str]:
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise ConfigError("the `deepspeed` launcher is not on PATH; run `bash install.sh`")
    where = ["--hostfile", args.hostfile] if args.hostfile else []
    if args.num_gpus or not args.hostfile:
        where += ["--num_gpus", str(args.num_gpus or 1)]
    return [launcher, *where, "--master_port", str(free_port()), *shlex.split(args.launcher_args),
            "--module", STEPS[step].module, *flags]


def run_step(step: int, cmd: list[str], folder: Path) -> float:
    """Stream the step's output to the console and a log; stop the pipeline on failure.
    The log is written beside the folder (the step refuses a non-empty one) and moved into
    <folder>/logs/ once the step has finished."""
    log_path = folder.with_name(folder.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"==> step {step}: {shlex.join(cmd)}", flush=True)
    start = time.time()
    last_error = ""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if line.lstrip().startswith("error:"):
                last_error = line.strip()
        code = proc.wait()
    minutes = (time.time() - start) / 60
    if code != 0:
        reason = f": {last_error}" if last_error else ""
        raise SystemExit(f"error: step {step} failed (exit {code}) after {minutes:.1f} min{reason}; "
                         f"log: {log_path}")
    kept = folder / "logs" / "console.log"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(log_path), kept)
    return minutes


def summary_line(step: int, folder: Path, minutes: float, preset: str) -> str:
    meta = STEPS[step]
    model = folder / meta.model if meta.model else folder
    summary = json.loads((model / "training_summary.json").read_text())
    metric, before, after = meta.headline
    change = ""
    if metric + before in summary and metric + after in summary:
        change = f"{metric} {summary[metric + before]:.4g} -> {summary[metric + after]:.4g}; "
    if step == 3:
        if "gt_score_first" in summary:
            change += f"ground-truth score {summary['gt_score_first']:.3f} -> {summary['gt_score_last']:.3f}; "
        change += f"KL {summary.get('kl_last', float('nan')):.4g}; "
    return (f"step {step} done in {minutes:.1f} min ({preset} recipe): {change}model: {model}; "
            f"log: {folder / 'logs' / 'console.log'}")


def pipeline_summary(minutes: float, preset: str, lines: list[str]) -> list[str]:
    return [f"pipeline done in {minutes:.1f} min, recipe {preset} (train.py --preset {preset})",
            *(f"    {line}" for line in lines)]


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = make_plan(args)
    check_outputs(args, plan)
    commands = {}
    for step in plan.run:
        flags = step_flags(step, args, plan)
        check_step_flags(step, flags)
        commands[step] = launcher_command(step, args, flags)
    check_tokenizers(args, plan)
    if plan.run:
        print(f"==> recipe: {args.preset} ({args.preset_reason}; --preset chooses another)", flush=True)
    for step in args.step:
        if step not in plan.run:
            print(f"==> step {step}: already finished in {plan.folder(step)} (--resume), skipped", flush=True)
    start, lines = time.time(), []
    for step in plan.run:
        minutes = run_step(step, commands[step], plan.folder(step))
        lines.append(summary_line(step, plan.folder(step), minutes, args.preset))
        print(f"==> {lines[-1]}", flush=True)
    if plan.run:
        print("==> " + "\n".join(pipeline_summary((time.time() - start) / 60, args.preset, lines)), flush=True)
    last = 3 if STEPS[3].done(plan.root) else 1 if STEPS[1].done(plan.root) else None
    if last:
        chat_path = plan.folder(last) / STEPS[last].model if STEPS[last].model else plan.folder(last)
        print(f"==> chat with it: python chat.py --path {chat_path}", flush=True)


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
