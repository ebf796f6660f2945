"""Shared by the end-to-end tests: start a step module as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, args, launcher=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m module args` (or `<launcher> --module module args`) from the repo root."""
    cmd = [*launcher, "--module", module] if launcher else [sys.executable, "-m", module]
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a refused run ends with (exit 2, no traceback)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def model_with_other_tokenizer(folder: Path, base: str = "tiny-llama") -> Path:
    """A copy of built-in `base` whose tokenizer has one extra token (a mismatch to refuse)."""
    import shutil

    from utils.model import load_tokenizer, resolve_model_path
    shutil.copytree(resolve_model_path(base), folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.add_tokens(["<not-in-the-other-vocabulary>"])
    tokenizer.save_pretrained(folder)
    return folder


class RunsCode:
    """Unpickling this calls os.makedirs(marker): it stands in for whatever code a pickle can run
    (torch.save pickles any object whose __reduce__ names a callable)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def save_malicious_weights(path: Path, marker: Path, state: dict | None = None) -> Path:
    """A pytorch_model.bin that looks like a state dict but creates `marker` when fully unpickled."""
    import torch
    torch.save({**(state or {}), "payload": RunsCode(marker)}, path)
    return path
