"""Hang detection: a thread on every rank that ends the run when no training step has finished
for training.hang_timeout_s.

A hung rank (a stopped process, a dead peer the launcher cannot see on another node, a network
or GPU fault) leaves the others waiting in a collective, which the main thread cannot leave.
This thread can: it writes every thread's Python stack to OUT/hang-<rank>.txt, says so on
stderr (and in OUT/exit.json on rank 0), and ends the process with EXIT_HUNG. Launchers stop
the other ranks; the Slurm template requeues the job, which resumes from the newest checkpoint.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

EXIT_HUNG = 76


class HangWatchdog:
    """Call beat(step) whenever a step finishes; stop() before the process ends normally."""

    def __init__(self, timeout_s: float, out: Path, rank: int, exit_record: Optional[Path] = None):
        self.timeout_s, self.rank = timeout_s, rank
        self.stacks = out / f"hang-{rank}.txt"
        self.exit_record = exit_record
        self.step, self.last = 0, time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mm1-hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 20, 30.0)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                self._end(idle)

    def _end(self, idle: float) -> None:
        message = (
            f"rank {self.rank}: no training step finished for {idle:.0f} s after step {self.step} "
            f"(training.hang_timeout_s={self.timeout_s:g}): the run is hung; every thread's stack is in "
            f"{self.stacks}. Exiting with {EXIT_HUNG}; resume with --resume auto"
        )
        with open(self.stacks, "w") as f:
            f.write(message + "\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        print(f"mm1 train: {message}", file=sys.stderr, flush=True)
        if self.exit_record is not None:
            record = {"code": EXIT_HUNG, "step": self.step, "message": message}
            self.exit_record.write_text(json.dumps(record) + "\n")
        os._exit(EXIT_HUNG)  # the main thread is stuck in a collective: no orderly exit exists
