"""train.py: the one-line launcher, on the quick preset, and its refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_quick_preset_runs_step1_through_deepspeed_launcher(tmp_path):
    out = tmp_path / "run"
    proc = launch("--preset", "quick", "--output-dir", str(out), "--step1-args", "--max_steps 8 --disable_tqdm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deepspeed" in proc.stdout and "--module training.step1_supervised_finetuning.main" in proc.stdout
    summary = json.loads((out / "step1_sft" / "training_summary.json").read_text())
    assert summary["steps"] == 8 and summary["loss_after"] < summary["loss_before"]
    assert "step1 done" in (out / "step1_sft.log").read_text()
    # a second run into the same folder is refused before any work starts
    again = launch("--preset", "quick", "--output-dir", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_unknown_step_is_refused():
    proc = launch("--step", "7")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --step 7")
