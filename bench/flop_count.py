"""FLOPs of a stretch of work as it runs: torch's FlopCounterMode (every matmul and attention
call, forward and backward, generation included), the same counter on both sides of a benchmark.

Its table lacks the CPU's flash attention (`_scaled_dot_product_flash_attention_for_cpu`), which
transformers' sdpa attention runs on a CPU: added here with the formula torch uses for the others.

`python -m bench.flop_count OUT ROUND -m training.step3_rlhf_finetuning.main ARGS...` runs our
Step 3 with its round number ROUND counted (a wrapper that only counts) and writes {"flops": N}
to OUT; the peers count theirs with CountedRound. The counter slows what it counts, so counted
runs are not timed ones.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

COUNTED_FLOPS = "counted_flops.json"  # the counted round's FLOPs, in our run's folder


def counter():
    """A FlopCounterMode (display off) that also counts the CPU's flash attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query_shape, key_shape, value_shape, *_, out_shape=None, **__):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *_, out_shape=None, **__):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


class CountedRound:
    """For the peers' trainer callbacks (train_begin, then step_end after each optimizer step,
    one a round): the FLOPs of round `round` (1-based; 0 counts nothing, `flops` stays None)."""

    def __init__(self, round: int):
        self.round, self.steps, self.mode, self.flops = round, 0, None, None

    def train_begin(self) -> None:
        self._start_if_next()

    def step_end(self) -> None:
        self.steps += 1
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.flops, self.mode = self.mode.get_total_flops(), None
        self._start_if_next()

    def _start_if_next(self) -> None:
        if self.steps + 1 == self.round:
            self.mode = counter()
            self.mode.__enter__()


def count_call(owner, name: str, call: int, out: Path) -> None:
    """Replace owner.name by a function that counts the FLOPs of its `call`-th call into `out`."""
    inner, calls = getattr(owner, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) != call:
            return inner(*args, **kwargs)
        with counter() as mode:
            result = inner(*args, **kwargs)
        out.write_text(json.dumps({"flops": mode.get_total_flops()}))
        return result
    setattr(owner, name, counted)


def counted_module(out: Path, round: int) -> list[str]:
    """What goes after `python -m` so that the Step 3 module named next runs with its round
    `round` counted into `out` (nothing when round is 0)."""
    return ["bench.flop_count", str(out), str(round), "-m"] if round else []


USAGE = "usage: python -m bench.flop_count OUT ROUND -m MODULE [ARGS...] (ROUND: 1 or more)"


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[3] != "-m" or not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
        print(f"error: {USAGE}", file=sys.stderr)
        raise SystemExit(2)
    out, round, module = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
    out.unlink(missing_ok=True)
    from training.step3_rlhf_finetuning import loop
    count_call(loop, "one_round", round, out)
    sys.argv = [module, *sys.argv[5:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
