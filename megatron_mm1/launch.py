"""Start the N local processes of one run and see them to the end: `mm1 train --nproc N` and
`mm1 benchmark` use this in place of torchrun.

- Each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT); rank 0's process group hosts the rendezvous store.
- One stop path: SIGTERM, SIGINT or SIGUSR1 to the launcher is passed to every rank, which saves
  at its next step boundary and exits (75 in training). Each rank runs in a session of its own,
  so a Ctrl-C or a signal to the launcher's process group reaches the ranks only this way,
  once. A signal to a rank itself reaches it directly (the ranks agree at each step).
- No orphans: when a rank exits with an error, the others get GRACE_S to end on their own (a
  clean stop ends every rank within moments); when a rank is killed by a signal or found the
  run hung (watchdog.py), or after the grace, the others' whole process groups (data-loader
  workers, checkpoint helpers) are killed. At the end every rank's group is killed. A killed
  launcher takes its ranks with it (PR_SET_PDEATHSIG).
- The exit code is the first failing rank's own code (signals as 128 + N), 0 when all succeed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from megatron_mm1.watchdog import EXIT_HUNG

GRACE_S = 30.0  # torchrun's default wait for the other workers after one failed
POLL_S = 0.1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def under_launcher() -> bool:
    """This process is one rank of a run that torchrun or srun started."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> None:
    """In a new child: SIGKILL when its parent `parent` dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


_forking: list[int] = []  # the pid of the process that is forking, set just before the fork


def children_die_with_this_process() -> None:
    """From now on, every process forked from this one (data-loader workers, megatron-core's
    checkpoint writers) is killed when it dies, even by kill -9. They would outlive it otherwise,
    some blocked for good on a lock it held. The kernel ties this to the forking thread: forks
    happen in the main thread here."""
    if not _forking:
        _forking.append(os.getpid())
        os.register_at_fork(before=lambda: _forking.__setitem__(0, os.getpid()),
                            after_in_child=lambda: _die_with_parent(_forking[0]))


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _first_failure(procs: list[subprocess.Popen]) -> int | None:
    """The return code of a failed rank, if any. Of ranks seen ending together, one killed by a
    signal is the likelier cause."""
    codes = [p.returncode for p in procs if p.returncode not in (None, 0)]
    return min(codes, key=lambda c: c > 0) if codes else None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the rank and everything it started have ended


def launch_local(nproc: int, module: str, args: list[str]) -> int:
    """Run `module.main()` with command-line `args` in `nproc` processes on this machine;
    returns the run's exit code."""
    # `-c`, not `-m module`: a helper process started by multiprocessing's spawn method would
    # re-import a `-m` main module, and with it torch and megatron-core (seconds each).
    entry = f"import sys; from {module} import main; sys.exit(main())"
    port, parent = free_port(), os.getpid()
    procs: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        for rank in range(nproc):
            # One OpenMP thread per rank unless asked otherwise, as torchrun does: N ranks with a
            # thread per core each would oversubscribe the CPUs.
            env = {"OMP_NUM_THREADS": "1", **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, "-c", entry, *args], env=env, start_new_session=True,
                                          preexec_fn=lambda: _die_with_parent(parent)))
        failed_at = failure = None
        while any(p.poll() is None for p in procs):
            if failure is None:
                failure = _first_failure(procs)
                # A rank killed by a signal, or hung, leaves its peers waiting in a collective.
                if failure is not None:
                    failed_at = time.monotonic() - (GRACE_S if failure == EXIT_HUNG or failure < 0 else 0)
            elif time.monotonic() - failed_at >= GRACE_S:
                stuck = [rank for rank, p in enumerate(procs) if p.poll() is None]
                print(f"mm1: a rank ended with code {_exit_code(failure)}; stopping ranks {stuck}",
                      file=sys.stderr, flush=True)
                break  # the `finally` below kills them
            time.sleep(POLL_S)
        failure = failure if failure is not None else _first_failure(procs)
        return 0 if failure is None else _exit_code(failure)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            _kill_group(p)
            p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
