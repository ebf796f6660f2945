"""One launcher for the InstructGPT pipeline; each step runs through the deepspeed launcher.

    python train.py                                  # embedded default: smollm2-135m, bundled data
    python train.py --preset quick                   # tiny model, about a minute
    python train.py --actor-model facebook/opt-1.3b --num-gpus 8 --step1-args "--learning_rate 1e-5"

On a machine without GPUs, --num-gpus N starts N CPU processes (gloo).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.cli import free_port
from utils.config import ConfigError

# Step 1 flags per preset. "default" is sized for minutes on a 2-core CPU with the real
# pretrained SmolLM2-135M; "quick" uses a tiny random model and is what the tests run.
PRESETS = {
    "default": {
        "actor_model": "smollm2-135m",
        "step1": ["--num_examples", "3000", "--max_seq_len", "128", "--per_device_train_batch_size", "8",
                  "--learning_rate", "5e-5", "--num_train_epochs", "1", "--lr_scheduler_type", "cosine",
                  "--num_warmup_steps", "5", "--log_interval", "5"],
    },
    "quick": {
        "actor_model": "tiny-llama",
        "step1": ["--num_examples", "600", "--max_seq_len", "96", "--per_device_train_batch_size", "8",
                  "--learning_rate", "1e-3", "--num_train_epochs", "1", "--dtype", "fp32",
                  "--log_interval", "5"],
    },
}
STEP_MODULES = {1: "training.step1_supervised_finetuning.main"}
STEP_DIRS = {1: "step1_sft"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, nargs="+", default=[1], help="steps to run, in order "
                        "(step 1 is available in this version)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--actor-model", default=None, help="actor model (default: the preset's)")
    parser.add_argument("--actor-zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes on this machine: GPUs, or CPU processes where there is no GPU")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --output-dir")
    parser.add_argument("--step1-args", default="", help="extra flags for Step 1, quoted")
    args = parser.parse_args(argv)
    for step in args.step:
        if step not in STEP_MODULES:
            raise ConfigError(f"--step {step} is not available (available: {sorted(STEP_MODULES)})")
    if args.num_gpus < 1:
        raise ConfigError("--num-gpus must be at least 1")
    return args


def step_command(step: int, args: argparse.Namespace, out_dir: Path) -> list[str]:
    preset = PRESETS[args.preset]
    flags = [*preset[f"step{step}"], "--model_name_or_path", args.actor_model or preset["actor_model"],
             "--zero_stage", str(args.actor_zero_stage), "--output_dir", str(out_dir)]
    if args.overwrite:
        flags.append("--overwrite_output_dir")
    flags += shlex.split(getattr(args, f"step{step}_args"))
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise ConfigError("the `deepspeed` launcher is not on PATH; run `bash install.sh`")
    return [launcher, "--num_gpus", str(args.num_gpus), "--master_port", str(free_port()),
            "--module", STEP_MODULES[step], *flags]


def run_step(step: int, cmd: list[str], out_dir: Path) -> None:
    """Stream the step's output to the console and to <out_dir>.log; stop the pipeline on failure."""
    log_path = out_dir.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"==> step {step}: {shlex.join(cmd)}", flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    minutes = (time.time() - start) / 60
    if code != 0:
        sys.exit(f"error: step {step} failed (exit {code}) after {minutes:.1f} min; log: {log_path}")
    print(f"==> step {step} done in {minutes:.1f} min; model: {out_dir}; log: {log_path}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.output_dir)
    for step in args.step:
        out_dir = root / STEP_DIRS[step]
        if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
            raise ConfigError(f"{out_dir} already holds a run; pass --overwrite to replace it or "
                              "choose another --output-dir")
    for step in args.step:
        out_dir = root / STEP_DIRS[step]
        run_step(step, step_command(step, args, out_dir), out_dir)


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
