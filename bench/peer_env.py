"""A python that can import the peer toolkit (trl) for side-by-side benchmarks.

This interpreter when it already has the wanted trl; otherwise a virtual environment in the
cache folder, one per trl version, created once, that sees this environment's packages (torch,
transformers, ...) and adds trl on top, so our own environment is never changed by a benchmark.
`bench.step3_throughput` uses trl 1.12 (its PPO trainer) and 1.16 (GRPO), `bench.grpo_vs_trl` trl 1.16.
"""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from utils.config import cache_dir

TRL_VERSIONS = {"1.12": "trl==1.12.0", "1.16": "trl==1.16.*"}
VENV_NAMES = {"1.12": "bench-trl-venv", "1.16": "bench-trl-1.16-venv"}  # 1.12 keeps its old folder


def _has_trl(python: str, version: str) -> bool:
    probe = f"import trl, sys; sys.exit(0 if trl.__version__.startswith('{version}') else 1)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def trl_env(version: str = "1.12") -> Path:
    """The cached environment's folder for trl `version` (it may not exist yet)."""
    return cache_dir() / VENV_NAMES[version]


def trl_python(version: str = "1.12", create: bool = True) -> str | None:
    """Path of a python with trl `version` importable, creating the cached environment if needed
    (with create=False: None when there is none yet)."""
    pin = TRL_VERSIONS[version]
    if _has_trl(sys.executable, version):
        return sys.executable
    env = trl_env(version)
    python = str(env / "bin" / "python")
    if not (Path(python).exists() and _has_trl(python, version)):
        if not create:
            return None
        print(f"creating {env} with {pin} (once) ...", flush=True)
        venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(env)
        done = subprocess.run([python, "-m", "pip", "install", "--quiet", pin], capture_output=True, text=True)
        if done.returncode or not _has_trl(python, version):
            raise SystemExit(f"could not install {pin} into {env}:\n{done.stderr[-2000:]}")
    return python
