"""A python that can import the peer toolkit (trl 1.12) for side-by-side benchmarks.

This interpreter when it already has trl 1.12; otherwise a virtual environment in the cache
folder, created once, that sees this environment's packages (torch, transformers, ...) and adds
trl 1.12 on top, so our own environment is never changed by a benchmark.
"""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from utils.config import cache_dir

TRL_PIN = "trl==1.12.0"


def _has_trl(python: str) -> bool:
    probe = "import trl, sys; sys.exit(0 if trl.__version__.startswith('1.12') else 1)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def trl_python() -> str:
    """Path of a python with trl 1.12 importable (creating the cached environment if needed)."""
    if _has_trl(sys.executable):
        return sys.executable
    env = cache_dir() / "bench-trl-venv"
    python = str(env / "bin" / "python")
    if not (Path(python).exists() and _has_trl(python)):
        print(f"creating {env} with {TRL_PIN} (once) ...", flush=True)
        venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(env)
        done = subprocess.run([python, "-m", "pip", "install", "--quiet", TRL_PIN], capture_output=True, text=True)
        if done.returncode or not _has_trl(python):
            raise SystemExit(f"could not install {TRL_PIN} into {env}:\n{done.stderr[-2000:]}")
    return python
