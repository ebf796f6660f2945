"""`--dtype auto` on CPU: bf16 only where this machine really computes it faster.

CPU flags say whether bf16 instructions exist (AVX512-BF16, AMX), not whether PyTorch's kernels
use them at this size and thread count: an AVX2-only CPU runs bf16 matmuls several times
slower than fp32 (docs/2026-11-23-step1-deepspeed-overhead.md), and this 2-core AMX Xeon runs
them ~20x faster. So auto times the same matmul in both dtypes, once per machine, and caches the
ratio under $RLHFKIT_CACHE/machine/ (keyed by CPU model, flags, torch version and threads), so
every process of a run reads the same answer instead of timing its own under load.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from filelock import FileLock

from utils.config import cache_dir

BF16_MIN_SPEEDUP = 1.5  # below this, bf16's rounding is not worth it


def _machine_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    fields = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    text = "\n".join([*fields, torch.__version__, f"threads={torch.get_num_threads()}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _best_seconds(dtype: torch.dtype, size: int, repeats: int) -> float:
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: kernel choice, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def measure_bf16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """fp32 matmul time over bf16's, best of `repeats` each (~0.5 s on a slow machine)."""
    return _best_seconds(torch.float32, size, repeats) / _best_seconds(torch.bfloat16, size, repeats)


def cpu_bf16_speedup() -> float:
    """This machine's bf16 speedup: read from the cache, else measured (under a lock, so the
    ranks of a run neither time it at once nor disagree) and cached."""
    folder = cache_dir() / "machine"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bf16_speedup-{_machine_key()}.json"
    with FileLock(str(path) + ".lock"):
        try:
            return float(json.loads(path.read_text())["speedup"])
        except (OSError, ValueError, KeyError, TypeError):
            speedup = measure_bf16_speedup()
            path.write_text(json.dumps({"speedup": speedup, "measured": time.strftime("%Y-%m-%d %H:%M")}))
            return speedup


def cpu_auto_dtype_name() -> str:
    return "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
