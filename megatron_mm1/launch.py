"""Start N local processes of a module under torch.distributed's launcher (torchrun)."""

from __future__ import annotations

import subprocess
import sys


def launch_local(nproc: int, module: str, args: list[str]) -> int:
    """Run `python -m module args` in `nproc` processes on this machine; returns the exit code."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", module, *args,
    ]
    return subprocess.call(cmd)
