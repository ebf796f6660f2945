"""Run one benchmark variant in a fresh subprocess (DeepSpeed patches torch process-wide, so
variants must not share a process) and read back the one `RESULT {json}` line it prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PREFIX = "RESULT "


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
