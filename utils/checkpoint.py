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

CHECKPOINTS = "checkpoints"
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


def save(engines: dict, state: LoopState, output_dir: str | Path, keep: int = 0) -> Path:
    """Write a checkpoint of `engines` ({name: DeepSpeed engine}) and `state`; every rank calls
    this. Returns the final folder. `keep` > 0 deletes all but the newest `keep` checkpoints."""
    from utils import ds_utils as ds

    name = f"step-{state.step:08d}"
    final, tmp = root(output_dir) / name, root(output_dir) / f".tmp-{name}"
    if ds.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving this step before
        tmp.mkdir(parents=True)
    ds.barrier()
    for engine_name, engine in engines.items():
        if _has_checkpointing(engine):
            engine.save_checkpoint(str(tmp), tag=engine_name, save_latest=False)
        else:
            _save_weights(engine, tmp / f"{engine_name}.safetensors")
    (tmp / f"rng-rank{ds.rank()}.json").write_text(json.dumps(rng_state()))
    ds.barrier()
    if ds.is_main():
        (tmp / STATE).write_text(json.dumps(asdict(state), default=float))
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in complete(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    ds.barrier()
    return final


def load(engines: dict, folder: Path) -> LoopState:
    """Restore `engines` (model, optimizer, scheduler) and this rank's RNG from `folder`."""
    from utils import ds_utils as ds
    from utils.config import ConfigError

    for engine_name, engine in engines.items():
        if not _has_checkpointing(engine):
            _load_weights(engine, folder / f"{engine_name}.safetensors")
            continue
        path, _ = engine.load_checkpoint(str(folder), tag=engine_name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"checkpoint {folder} has no state for {engine_name}")
    rng = folder / f"rng-rank{ds.rank()}.json"
    if rng.is_file():  # absent when resuming with more processes than saved
        set_rng_state(json.loads(rng.read_text()))
    return LoopState(**json.loads((folder / STATE).read_text()))


def _has_checkpointing(engine) -> bool:
    """Frozen ZeRO-3 engines (the EMA actor) have no DeepSpeed checkpoint engine: their weights
    are all there is to keep, so they are saved as one safetensors file instead."""
    return getattr(engine, "checkpoint_engine", None) is not None


def _save_weights(engine, path: Path) -> None:
    from safetensors.torch import save_file

    from utils import ds_utils as ds
    state = ds.gathered_state_dict(engine)  # a collective under ZeRO-3: every rank calls it
    if ds.is_main():
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _load_weights(engine, path: Path) -> None:
    import deepspeed
    from safetensors.torch import load_file

    from utils import ds_utils as ds
    from utils.config import ConfigError
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing")
    state = load_file(str(path))
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if hasattr(param, "ds_id"):  # ZeRO-3 partitioned: gather, set on rank 0, re-shard
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if ds.is_main():
                        param.copy_(state[name])
            else:
                param.copy_(state[name])
