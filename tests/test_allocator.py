"""glibc's malloc policy (utils/allocator.py): freed blocks kept for reuse, given back on demand."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import allocator

ROOT = Path(__file__).resolve().parents[1]
# glibc's mallinfo2, for the fresh interpreters below
MALLINFO = """
import ctypes
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
"""
# In a fresh interpreter: where glibc puts a 64 MiB block (a round's logits), and what it keeps
# once the block is freed, from mallinfo2: hblkhd (bytes in mmapped blocks), fordblks (free heap).
WHERE_A_BLOCK_GOES = MALLINFO + """
import sys, torch
from utils.allocator import keep_freed_blocks
print(keep_freed_blocks(available=0.0) if sys.argv[1] == "keep" else False)
before = libc.mallinfo2()
block = torch.ones(16 << 20)
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, after.fordblks - before.fordblks)
"""
MIB = 1 << 20


def where_a_block_goes(policy: str, env: dict | None = None) -> tuple[bool, int, int]:
    """(keep_freed_blocks applied, bytes of the block that were mmapped, free bytes the heap kept)."""
    out = subprocess.run([sys.executable, "-c", WHERE_A_BLOCK_GOES, policy], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, **(env or {})}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33+ only")
def test_a_large_block_is_served_from_the_heap_and_kept_when_freed():
    """glibc's default maps a 64 MiB block and unmaps it on free (its pages fault in again on the
    next step); keep_freed_blocks serves it from the heap and keeps it there for reuse."""
    _, mapped, kept = where_a_block_goes("default")
    assert mapped >= 64 * MIB and kept < MIB
    applied, mapped, kept = where_a_block_goes("keep")
    assert applied and mapped == 0 and kept >= 64 * MIB


# In a fresh interpreter: three 100 MiB blocks freed last-first, so they end at the heap's top;
# how much of the top glibc keeps afterwards (mallinfo2.keepcost).
TOP_AFTER_FREE = MALLINFO + """
from utils.allocator import keep_freed_blocks
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
assert keep_freed_blocks(available=0.0)
blocks = [libc.malloc(100 << 20) for _ in range(3)]
for block in blocks:
    libc.memset(block, 1, 100 << 20)
for block in reversed(blocks):
    libc.free(block)
print(libc.mallinfo2().keepcost)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33+ only")
def test_the_heaps_top_is_kept_when_blocks_at_it_are_freed():
    """A backward frees the activations from the heap's top; they stay for the next forward.
    (A 4 GiB trim threshold went into mallopt's C int as 0 and trimmed the top on every free.)"""
    out = subprocess.run([sys.executable, "-c", TOP_AFTER_FREE], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert int(out) >= 300 * MIB


def test_mallopt_refuses_a_value_a_c_int_cannot_hold():
    class Libc:
        def mallopt(self, param, value):
            return 1

    assert allocator._mallopt(Libc(), allocator.M_TRIM_THRESHOLD, -1)
    with pytest.raises(ValueError, match="C int"):
        allocator._mallopt(Libc(), allocator.M_TRIM_THRESHOLD, 4 << 30)


def test_the_users_own_malloc_settings_are_left_alone(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert not allocator.user_tuned_malloc()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert allocator.user_tuned_malloc()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.user_tuned_malloc() and not allocator.keep_freed_blocks()
    applied, mapped, _ = where_a_block_goes("keep", {"MALLOC_TRIM_THRESHOLD_": "0"})
    assert not applied and mapped >= 64 * MIB


def test_freed_blocks_are_kept_only_with_memory_to_spare(monkeypatch):
    """A run whose models leave less than KEEP_WHEN_AVAILABLE of the memory free keeps glibc's
    default (a 1.7B LoRA Step 3 peaked 0.5-1.2 GB higher with its blocks kept)."""
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator, "_libc", Libc)
    monkeypatch.setattr(allocator, "on_cuda", lambda: False)
    monkeypatch.setattr(allocator, "user_tuned_malloc", lambda: False)
    monkeypatch.setattr(allocator, "memory_available_share", lambda: allocator.KEEP_WHEN_AVAILABLE - 0.01)
    assert not allocator.keep_freed_blocks() and not calls
    monkeypatch.setattr(allocator, "memory_available_share", lambda: allocator.KEEP_WHEN_AVAILABLE)
    assert allocator.keep_freed_blocks()
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD),
                     (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]


def test_release_freed_memory_returns_the_heap_pages_glibc_kept():
    """64 KiB blocks live in glibc's heap: freed with every 50th kept, glibc keeps the pages;
    release_freed_memory gives them back (the measured 135M ZeRO-3 case: 0.7 GB a rank)."""
    from bench.memory import rss_kib

    def rss_mb():
        return rss_kib("VmRSS") / 1024

    blocks = [torch.ones(16384) for _ in range(5000)]  # 320 MB
    kept = blocks[::50]
    del blocks
    before = rss_mb()
    allocator.release_freed_memory()
    assert before - rss_mb() > 200, "malloc_trim returned less than 200 of the 314 MB freed"
    assert all(float(b[0]) == 1.0 for b in kept)


def test_step3_trims_between_phases_only_when_memory_is_tight(monkeypatch):
    assert 0.0 < allocator.memory_available_share() <= 1.0
    trims = []
    monkeypatch.setattr(allocator, "release_freed_memory", lambda: trims.append(1))
    for share, trimmed in ((0.9, 0), (allocator.TIGHT_MEMORY - 0.01, 1)):
        monkeypatch.setattr(allocator, "memory_available_share", lambda: share)
        allocator.release_freed_memory_if_tight()
        assert len(trims) == trimmed
