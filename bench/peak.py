"""The machine's measured matrix-multiply peak, the yardstick for each phase's FLOP/s.

A square matmul large enough to be compute-bound, best of several timed runs after a warm-up.
A CPU without a native bf16 path runs bf16 several times slower than fp32, so the peak must be
taken for the dtype a run really uses (figures: docs/2026-11-23-step1-deepspeed-overhead.md).

    python -m bench.peak --dtype fp32

`generation_floor_s` turns it into the least time a generation's matmuls can take here: the
prefill at the peak, each decode step at the measured speed of that step's matmuls alone. At a
few rows a decode step reads every weight from memory for a few multiply-adds each, so that
speed is far below the peak: the floor says how much of a generation's distance from the peak
is the machine's and how much the code's.
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


def _linears(model: torch.nn.Module) -> list[torch.Tensor]:
    """Weights of the model's linear layers as (in, out) matrices, LM head included, each once
    (a head tied to the embeddings is read in every decode step like any other)."""
    from utils.flops import _in_out  # the one test of what counts as a linear layer
    seen, weights = set(), []
    for module in model.modules():
        if _in_out(module) is None:
            continue
        # nn.Linear keeps (out, in); transformers' Conv1D (GPT-2) keeps (in, out)
        weight = module.weight.t() if isinstance(module, torch.nn.Linear) else module.weight
        if weight.data_ptr() not in seen:
            seen.add(weight.data_ptr())
            weights.append(weight)
    return weights


@torch.no_grad()
def decode_step_seconds(model: torch.nn.Module, rows: int, repeats: int = 5) -> float:
    """Best time of one decode step's matmuls alone: `rows` token vectors through every linear
    layer of `model` in turn, with its real weights (no attention, norms or sampling)."""
    weights = _linears(model)
    inputs = {w.shape[0]: torch.randn(rows, w.shape[0], device=w.device, dtype=w.dtype) for w in weights}
    sync = torch.cuda.synchronize if weights[0].is_cuda else (lambda: None)

    def step() -> None:
        for w in weights:
            inputs[w.shape[0]] @ w
        sync()

    step()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def generation_floor_s(model: torch.nn.Module, rows: int, prompt_len: int, new_tokens: int, peak: float) -> float:
    """The least time `rows` answers of `new_tokens` tokens after `prompt_len`-token prompts take
    on this machine by their matmuls alone: the prefill's FLOPs (utils.flops) at the square
    matmul peak, then new_tokens - 1 decode steps at decode_step_seconds. Attention, norms and
    sampling are left out, so the real time is longer."""
    from utils.flops import forward_flops, shape
    if new_tokens <= 0:
        return 0.0
    prefill = forward_flops(shape(model.config, model), rows, prompt_len, logits=1) / peak
    return prefill + (new_tokens - 1) * decode_step_seconds(model, rows)


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
