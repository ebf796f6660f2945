"""Entry-point wrapper: user mistakes end in one clear line and a non-zero exit."""
from __future__ import annotations

import os
import sys

from utils.config import ConfigError


def run_entry(main, argv=None) -> None:
    """Call `main(argv)`; a ConfigError prints `error: <message>` and exits 2.

    Config errors are deterministic, so under a launcher every rank hits the same one:
    only local rank 0 prints it, keeping the console to one line. An error that depends on the
    rank's data (`every_rank`, e.g. a failing reward function) is printed wherever it happens."""
    try:
        main(argv)
    except ConfigError as err:
        if getattr(err, "every_rank", False) or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        _teardown()
        sys.exit(2)
    except KeyboardInterrupt:
        _teardown()
        sys.exit(130)


def deepspeed_launcher() -> str:
    """The `deepspeed` launcher installed beside this interpreter (a virtual environment need
    not be on PATH), else the one on PATH."""
    import shutil
    from pathlib import Path
    beside = Path(sys.executable).parent / "deepspeed"
    return str(beside) if beside.is_file() else shutil.which("deepspeed")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teardown() -> None:
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # the process is exiting anyway; the original error matters more
        pass
