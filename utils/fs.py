"""The one way this project writes a folder: build it aside, then rename it into place."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from utils.config import ConfigError

# The disk refused the write: full, over quota, a file too large, read-only, no permission, I/O error.
REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


# An output folder's own sub-folders: the run's logs and its checkpoints survive the atomic
# write of the model beside them.
LOG_SUBDIR = "logs"
CHECKPOINTS = "checkpoints"


class WriteRefused(ConfigError):
    """A write the disk refused (see REFUSED): reported as one error line, like a ConfigError."""


def refused(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in REFUSED


def refused_write(err: OSError, what) -> WriteRefused:
    """One line naming what could not be written and why (e.g. 'No space left on device')."""
    why = err.strerror or str(err)
    return WriteRefused(f"could not write {what}: {why}" + (f" ({err.filename})" if err.filename else ""))


def atomic_directory_write(output_dir: str | Path, write_fn, keep: tuple[str, ...] = ()) -> None:
    """Run `write_fn(tmp_dir)` then move the result into `output_dir` in one rename.

    A crash mid-write leaves the previous contents of `output_dir` untouched (a reader sees
    all of the old folder or all of the new one). Entries named in `keep` (e.g. a run's
    live log folder) are carried over from the old folder, and put back if the write fails.
    A write the disk refuses (full, read-only: see REFUSED) raises WriteRefused, one line."""
    output_dir = Path(output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    except OSError as err:
        if refused(err):
            raise refused_write(err, output_dir) from err
        raise
    moved, old = [], None  # keep entries carried into tmp; the old folder while it is aside
    try:
        write_fn(tmp)
        for name in keep:
            if (output_dir / name).exists():
                os.rename(output_dir / name, tmp / name)
                moved.append(name)
        if output_dir.exists():  # rename cannot replace a non-empty folder: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.rename(output_dir, old)  # replaces the empty placeholder
            os.rename(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
            old = None
        else:
            os.rename(tmp, output_dir)
    except BaseException as err:
        _put_back(output_dir, tmp, old, moved)
        if refused(err):
            raise refused_write(err, output_dir) from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _put_back(output_dir: Path, tmp: Path, old: Path | None, moved: list[str]) -> None:
    """Undo a failed atomic_directory_write (best effort): the old folder and its kept entries
    back in place, nothing else touched."""
    with contextlib.suppress(OSError):
        if old is not None:
            if output_dir.exists():  # the move aside failed: `old` is still the empty placeholder
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, output_dir)
    for name in moved:
        with contextlib.suppress(OSError):
            if (tmp / name).exists() and output_dir.is_dir() and not (output_dir / name).exists():
                os.rename(tmp / name, output_dir / name)


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


def replace_directories(moves: dict) -> None:
    """Rename each built folder onto its destination (`{built: destination}`, same file system),
    all or none: if a rename fails, the destinations already replaced get their old folders
    back. The old folders are deleted only once every new one is in place. A rename the disk
    refuses (see REFUSED) raises WriteRefused, one line."""
    placed = []  # (built, destination, the old folder moved aside or None), in order
    try:
        for built, dest in moves.items():
            built, dest = Path(built), Path(dest)
            aside = (Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                     if dest.exists() else None)
            placed.append((built, dest, aside))
            if aside is not None:
                os.rename(dest, aside)  # replaces the empty placeholder
            os.rename(built, dest)
    except BaseException as err:
        for new, target, aside in reversed(placed):
            with contextlib.suppress(OSError):
                if not new.exists() and target.exists():  # the new folder was moved in: out again
                    os.rename(target, new)
                if aside is not None:
                    if target.exists():  # the move aside failed: `aside` is the empty placeholder
                        shutil.rmtree(aside, ignore_errors=True)
                    else:
                        os.rename(aside, target)
        if refused(err):  # `dest`: the folder being replaced when it failed
            raise refused_write(err, dest) from err
        raise
    for _, _, aside in placed:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds files, unless asked to."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {output_dir} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {output_dir} already holds files; pass "
                          "--overwrite_output_dir to replace them or choose another folder")
