"""The one way this project writes a folder: build it aside, then rename it into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_directory_write(output_dir: str | Path, write_fn, keep: tuple[str, ...] = ()) -> None:
    """Run `write_fn(tmp_dir)` then move the result into `output_dir` in one rename.

    A crash mid-write leaves the previous contents of `output_dir` untouched (a reader sees
    all of the old folder or all of the new one). Entries named in `keep` (e.g. a run's
    live log folder) are carried over from the old folder."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        write_fn(tmp)
        for name in keep:
            if (output_dir / name).exists():
                os.rename(output_dir / name, tmp / name)
        if output_dir.exists():  # rename cannot replace a non-empty folder: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.rename(output_dir, old)  # replaces the empty placeholder
            os.rename(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and one rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
