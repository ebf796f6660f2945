"""Run a step as a user would, on a disk that fills up (used by tests/test_bad_input.py).

Usage: RLHFKIT_TEST_FULL_DISK=<path prefix> python -m tests.full_disk <step module> <step flags>

Every weights or checkpoint file written to a path that starts with the prefix (through
utils.safetensors_stream, which the final model and the EMA's checkpoint go through, safetensors'
save_file, or torch.save, which DeepSpeed's checkpoints go through) gets a few bytes and then fails with ENOSPC, as a real write does when
the disk fills in the middle of a file. Everything else is written normally.
"""
from __future__ import annotations

import errno
import importlib
import os
import sys


def _fill(path) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * 64)  # the part that still fitted
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def install(prefix: str) -> None:
    import safetensors.torch
    import torch

    import utils.safetensors_stream as stream

    real_save_file, real_torch_save = safetensors.torch.save_file, torch.save

    def save_file(tensors, filename, *args, **kwargs):
        if str(filename).startswith(prefix):
            _fill(filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    def torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f).startswith(prefix):
            _fill(f)
        return real_torch_save(obj, f, *args, **kwargs)

    real_create = stream._create

    def create(path):
        if str(path).startswith(prefix):
            _fill(path)
        return real_create(path)

    safetensors.torch.save_file, torch.save, stream._create = save_file, torch_save, create


if __name__ == "__main__":
    from utils.cli import run_entry

    install(os.environ["RLHFKIT_TEST_FULL_DISK"])
    run_entry(importlib.import_module(sys.argv[1]).main, sys.argv[2:])
