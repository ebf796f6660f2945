"""Run one benchmark variant in a fresh subprocess (DeepSpeed patches torch process-wide, so
variants must not share a process) and read back the one `RESULT {json}` line it prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from utils.model import resolve_dtype_name

PREFIX = "RESULT "


def child_env(device: str) -> dict:
    """A benchmark child's environment: offline hub; a CPU benchmark stays on the CPU even on a
    GPU machine."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def report_table(title: str, columns: dict, rows: list[dict], args) -> None:
    """Print `title` and a markdown table of `rows`, one column per header of `columns` (each
    value formats a row's cell); with `args.json`, also write {"args", "rows"} there."""
    print(title)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(cell(r) for cell in columns.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


def report_result(result: dict) -> None:
    """In the child: hand the measured numbers to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(module: str, variant: str, args, skip: tuple[str, ...]) -> dict:
    """`python -m module --variant variant` with the parent's other flags (minus `skip` and
    unset ones); exits with the child's output if it printed no result."""
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", *skip) and v is not None]
    proc = subprocess.run([sys.executable, "-m", module, "--variant", variant, *flags],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return read_result(proc, variant)


def read_result(proc: subprocess.CompletedProcess, name: str) -> dict:
    """In the parent: the child's `RESULT {json}` line, or exit with its output if it failed."""
    line = next((l for l in proc.stdout.splitlines() if l.startswith(PREFIX)), None)
    if line is None:
        sys.exit(f"{name} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len(PREFIX):])


def child_or_runs(module: str, variants, args, run_variant, skip: tuple[str, ...]) -> dict | None:
    """The benchmarks' shared main: in a child (`--variant` given) measure that variant with
    `run_variant(args)` and report it (returns None); in the parent run every variant in its own
    child, alternating, `args.repeats` times, and return {variant: [results...]}."""
    args.dtype = resolve_dtype_name(args.dtype, "cpu")
    if args.variant:
        report_result(run_variant(args))
        return None
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            runs[name].append(run_child(module, name, args, skip=skip))
    return runs


def best_runs(runs: dict) -> dict:
    """Each variant's fastest run (tokens per second)."""
    return {name: max(results, key=lambda r: r["tokens_per_s"]) for name, results in runs.items()}
