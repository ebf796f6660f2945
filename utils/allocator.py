"""How freed CPU memory is kept or given back (glibc's malloc), for speed and for peak memory.

By default glibc serves blocks above a threshold (growing to 32 MiB) by mmap and unmaps them on
free, and trims its heap's top beyond twice that. A training step frees and re-allocates the same
tensors every time: large ones (logits over the vocabulary, the embedding's gradient) as fresh
mmaps, and the activations, which a backward frees from the heap's top, after a trim. Each comes
back with a page fault per 4 KiB. `keep_freed_blocks` serves blocks up to 256 MiB from the heap
and never trims its top. On SmolLM2-135M PPO (512 MiB kept at the top, the first version) the
update's page faults fell from 250-480k to 1-230k a round and its time by ~9%, for ~0.1 GB more
peak RSS (docs/2026-12-06-allocator.md).

It starts once the models are built, and only while 85% of the machine's memory is still
available then: a run that will need much of the machine keeps glibc's default, which peaks
lower (a SmolLM2-1.7B LoRA run peaked at 14.4 GB with it, 14.9-15.6 GB with its rounds' blocks
kept, 16.6 GB with its loading's kept too). `release_freed_memory` gives the kept pages back
(malloc_trim) where memory matters more than the faults: after each engine build, and between
Step 3's phases while the machine is short of memory.

Nothing here acts on CUDA machines or without glibc, nor against the user's own malloc settings.
"""
from __future__ import annotations

import ctypes
import os

from utils.dist import on_cuda

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap: a round's logits and embedding gradients of
# models up to ~1B parameters. Larger ones (whole weights while a model loads) keep mmap.
MMAP_THRESHOLD = 256 << 20
# glibc never trims the heap's top on its own (mallopt(3): -1 disables trimming): a GRPO update's
# activations (4 GB for SmolLM2-135M at 32 x 96 tokens) stay for the next forward. mallopt takes
# a C int, so no threshold above 2 GiB can be asked for: 4 GiB went in as 0 and trimmed on every
# free (a 135M GRPO update then took 0.4-1.4M page faults in 3 rounds of 4).
TRIM_THRESHOLD = -1
C_INT_MAX = (1 << 31) - 1
# Below this share of the machine's memory available, Step 3 trims between its phases.
TIGHT_MEMORY = 1 / 3
# At or above this share available once the models are built, freed blocks are kept: SmolLM2-135M
# PPO left 0.96 available here (24 GiB), the 1.7B LoRA run 0.75 (it peaks at 15 GB).
KEEP_WHEN_AVAILABLE = 0.85


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc


def user_tuned_malloc() -> bool:
    """The user set glibc's malloc parameters through the environment: leave them as they are."""
    return any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ) or \
        "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_blocks(available: float = KEEP_WHEN_AVAILABLE) -> bool:
    """Serve blocks up to MMAP_THRESHOLD from glibc's heap and keep freed pages for reuse (see
    the module docstring), once the models are built, and only while at least `available` of
    the machine's memory is: a run that will need much of it keeps glibc's default, which
    peaks lower. Returns whether the setting was applied."""
    if on_cuda() or user_tuned_malloc() or memory_available_share() < available:
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return _mallopt(libc, M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(libc, M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def _mallopt(libc, param: int, value: int) -> bool:
    """mallopt(param, value); ctypes would pass a value beyond a C int silently cut to 32 bits."""
    if not -C_INT_MAX - 1 <= value <= C_INT_MAX:
        raise ValueError(f"mallopt takes a C int, not {value}")
    return bool(libc.mallopt(param, value))


def release_freed_memory() -> None:
    """Give the pages glibc holds free back to the system (malloc_trim), on CPU.

    Each rank loads whole models before DeepSpeed partitions or wraps them; the freed copies
    stay in glibc's heap, so under ZeRO-3 on 2 processes a 135M run's ranks kept ~2.6 GB each
    they no longer used (docs/2026-12-05-memory.md). Trimmed once per engine built, and between
    Step 3's phases while memory is short (release_freed_memory_if_tight). (Serving every
    block of 64 KiB or more by mmap instead returns the same memory but made a PPO round 1.6x
    slower.)"""
    libc = None if on_cuda() else _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def memory_available_share() -> float:
    """MemAvailable / MemTotal from /proc/meminfo; 1.0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / int(info["MemTotal"].split()[0])
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return 1.0


def release_freed_memory_if_tight() -> None:
    """release_freed_memory between Step 3's phases, only while the machine is short of memory.

    Each phase frees what the next one cannot reuse (generation's KV cache, scoring's logits,
    training's activations and ZeRO-3's gathered weights); trimmed, a 135M ZeRO-3 run on 2
    processes peaked 0.7 GB lower per rank. But the pages come back with a fault each: ~0.25 s
    per GB returned here, a few % of a round, so it is not paid while memory is plentiful."""
    if memory_available_share() < TIGHT_MEMORY:
        release_freed_memory()
