"""Resumable training state: DeepSpeed engine checkpoints plus the loop's position and RNG states.

A checkpoint is one folder `<output_dir>/checkpoints/step-NNNNNNNN/`:
  <engine name>/...        each engine's DeepSpeed checkpoint (model, optimizer, LR scheduler;
                           sharded as trained, one file per rank under ZeRO)
  rng-rank<R>.json         each rank's python/numpy/torch RNG states, as JSON (no pickles)
  state.json               where the loop stood (step, epoch, batches consumed, evaluations,
                           step-specific state); written last
Every rank writes into `.tmp-step-NNNNNNNN/`, and rank 0 renames it into place once all are
done, so a crash while saving leaves only a temporary folder, never a torn checkpoint; the
newest complete checkpoint is the newest folder with a state.json. `keep` prunes older ones.
Checkpoints hold DeepSpeed's own torch.save files: load only checkpoints this toolkit wrote.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils import dist
from utils.fs import CHECKPOINTS

STATE = "state.json"


@dataclass
class LoopState:
    step: int = 0           # optimizer steps taken
    epoch: int = 0          # the epoch in progress
    batches_done: int = 0   # micro-batches of that epoch already consumed
    evals: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # step-specific (e.g. Step 3's KL controller)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def complete(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = root(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / STATE).is_file())


def latest(output_dir: str | Path) -> Path | None:
    done = complete(output_dir)
    return done[-1] if done else None


def save(strategy, engines: dict, state: LoopState, output_dir: str | Path, keep: int = 0) -> Path:
    """Write a checkpoint of `engines` ({name: DeepSpeed engine}, through `strategy`) and
    `state`; every rank calls this. Returns the final folder. `keep` > 0 deletes all but the
    newest `keep` checkpoints."""
    name = f"step-{state.step:08d}"
    final, tmp = root(output_dir) / name, root(output_dir) / f".tmp-{name}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving this step before
        tmp.mkdir(parents=True)
    dist.barrier()
    for engine_name, engine in engines.items():
        strategy.save_engine(engine, tmp, engine_name)
    (tmp / f"rng-rank{dist.rank()}.json").write_text(json.dumps(rng_state()))
    dist.barrier()
    if dist.is_main():
        (tmp / STATE).write_text(json.dumps(asdict(state), default=float))
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in complete(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(strategy, engines: dict, folder: Path) -> LoopState:
    """Restore `engines` (model, optimizer, scheduler) and this rank's RNG from `folder`."""
    for engine_name, engine in engines.items():
        strategy.load_engine(engine, folder, engine_name)
    rng = folder / f"rng-rank{dist.rank()}.json"
    if rng.is_file():  # absent when resuming with more processes than saved
        set_rng_state(json.loads(rng.read_text()))
    return LoopState(**json.loads((folder / STATE).read_text()))
