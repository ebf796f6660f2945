"""Build-once directories in the run-time cache, safe when several processes ask at once.

A directory is built into a temporary sibling and renamed into place under a file lock,
so a reader never sees a half-written model. A small stamp file records what it was
built from; a stale stamp (new build recipe, new tokenizer) triggers a rebuild, and so does a
stamped folder that lacks one of the files the build must write (a build can count only once
it is whole).

Whichever process takes the lock first builds, whatever its distributed rank: build functions
must write everything on any rank (see save_model).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from filelock import FileLock

from utils.fs import atomic_directory_write

STAMP = "rlhfkit_build.json"
# What a built-in model folder must hold before it counts as built.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _built(path: Path, stamp: dict, required: tuple[str, ...]) -> bool:
    return read_stamp(path) == stamp and all((path / name).is_file() for name in required)


def build_once(path: Path, stamp: dict, build: Callable[[Path], None],
               required: tuple[str, ...] = ()) -> Path:
    """Return `path`, first running `build(tmp_dir)` unless it already holds `stamp` and the
    `required` files. A build that leaves out a required file raises, and nothing is stamped."""
    if _built(path, stamp, required):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if _built(path, stamp, required):  # another process built it while we waited
            return path

        def write(tmp: Path) -> None:
            build(tmp)
            missing = [name for name in required if not (tmp / name).is_file()]
            if missing:
                raise RuntimeError(f"building {path} wrote no {', '.join(missing)} (nothing was cached)")
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))

        atomic_directory_write(path, write)  # a stale build is replaced whole
    return path


def save_model(model, out: Path) -> None:
    """`model.save_pretrained(out)`, writing config and weights on whichever process builds.

    Once torch.distributed is initialized, transformers' save_pretrained writes config.json,
    generation_config.json and the weights only on rank 0 and silently skips them elsewhere
    (PreTrainedModel.should_save_on_this_rank). A cache build runs on the rank that takes the
    lock first, after init_distributed (`deepspeed --num_gpus 2` on a cold cache): when that
    was rank 1, the cached model held only its tokenizer and every rank failed to load it.
    The model is saved whole here, as it would be outside a process group."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(out, is_main_process=True)
    finally:
        del model.should_save_on_this_rank
