"""The machine's measured matrix-multiply peak, the yardstick for each phase's FLOP/s.

A square matmul large enough to be compute-bound, best of several timed runs after a warm-up.
A CPU without a native bf16 path runs bf16 several times slower than fp32, so the peak must be
taken for the dtype a run really uses (figures: docs/2026-11-23-step1-deepspeed-overhead.md).

    python -m bench.peak --dtype fp32
"""
from __future__ import annotations

import argparse
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak_flops(dtype: str = "fp32", device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device`."""
    a = torch.randn(size, size, device=device).to(DTYPES[dtype])
    b = torch.randn(size, size, device=device).to(DTYPES[dtype])
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel choice, page faults)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    peak = matmul_peak_flops(args.dtype, args.device, args.size)
    print(f"matmul peak, {args.dtype} on {args.device} ({torch.get_num_threads()} threads): "
          f"{peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
