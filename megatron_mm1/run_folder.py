"""One run per folder: a lock that no crash leaves behind, and no new run over an old one.

The lock is an flock on OUT/run.lock held by rank 0 of the run, whatever started it (`mm1 train
--nproc`, torchrun, srun). The kernel drops an flock when its holder dies, however it dies (a
crash, kill -9, a node lost, a requeued job), so the lock never goes stale; the file's text only
names the holder for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from megatron_mm1.checkpoint import complete_checkpoints
from megatron_mm1.config import ConfigError

LOCK = "run.lock"


def lock_run_folder(out: Path) -> IO:
    """Hold OUT/run.lock for as long as the returned file stays open (this process's life);
    ConfigError naming the holder when another run holds it."""
    lock = _locked(out)
    lock.seek(0)
    lock.truncate()
    job = os.environ.get("SLURM_JOB_ID")
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}{f', Slurm job {job}' if job else ''}, "
               f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock


def refuse_if_locked(out: Path) -> None:
    """ConfigError naming the holder when a run holds OUT now: a check before launching one (its
    rank 0 then takes the lock itself)."""
    if (out / LOCK).exists():
        _locked(out).close()


def _locked(out: Path) -> IO:
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not written its name yet"
        lock.close()
        raise ConfigError(
            f"{out} is in use by another run ({holder}). Wait for it to end or stop it, or give "
            "another --out"
        ) from None
    except OSError as e:  # a filesystem without locks (e.g. NFS without lockd)
        print(f"mm1 train: warning: cannot lock {out / LOCK} ({e}); nothing stops a second run on "
              "this folder", file=sys.stderr, flush=True)
    return lock


def refuse_existing_run(out: Path, resume: str | None) -> None:
    """A new run (no --resume) only into a folder that holds no run yet: one that did would mix
    two runs' metrics and checkpoints."""
    if resume:
        return
    found = [str(p.relative_to(out)) for p in complete_checkpoints(out / "checkpoints")[-1:]]
    found += ["metrics.jsonl"] if (out / "metrics.jsonl").exists() else []
    if found:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(found)}). Continue it with --resume auto, or "
            "give a new --out"
        )
