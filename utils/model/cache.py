"""Build-once directories in the run-time cache, safe when several processes ask at once.

A directory is built into a temporary sibling and renamed into place under a file lock,
so a reader never sees a half-written model. A small stamp file records what it was
built from; a stale stamp (new build recipe, new tokenizer) triggers a rebuild.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from filelock import FileLock

from utils.fs import atomic_directory_write

STAMP = "rlhfkit_build.json"


def read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP).read_text())
    except (OSError, ValueError):
        return None


def build_once(path: Path, stamp: dict, build: Callable[[Path], None]) -> Path:
    """Return `path`, first running `build(tmp_dir)` unless it already holds `stamp`."""
    if read_stamp(path) == stamp:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if read_stamp(path) == stamp:  # another process built it while we waited
            return path

        def write(tmp: Path) -> None:
            build(tmp)
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))

        atomic_directory_write(path, write)  # a stale build is replaced whole
    return path
