"""A real two-node Slurm cluster on this machine, for tests: munge, slurmctld and two slurmd
(node1, node2) under one temporary folder, talking only to 127.0.0.1.

Everything it starts has a pid file under the folder and is stopped by it. The munge daemon
is private (own key and socket, `AuthInfo=socket=...`), so the machine's /etc/munge is not
touched. Free ports and a random first job id keep two clusters on one machine (concurrent
test runs) apart: the launcher derives the rendezvous port from the job id.

    python tests/slurm_cluster.py start DIR   # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop DIR
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("node1", "node2")


def available() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS) and bool(shutil.which("sbatch"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    ctld_port, p1, p2 = _free_port(), _free_port(), _free_port()
    return "\n".join([
        "ClusterName=mm1test",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "KillWait=10",
        "MinJobAge=600",
        "MailProg=/bin/true",
        f"FirstJobId={random.randint(1000, 60000)}",
        f"StateSaveLocation={root}/state",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdPidFile={root}/slurmd.%n.pid",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmdLogFile={root}/slurmd.%n.log",
        f"NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=2 RealMemory=10000",
        f"NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=2 RealMemory=10000",
        # A job in `urgent` preempts those in `debug`: Slurm sends the batch script its --signal
        # (send_user_signal), gives it GraceTime, then requeues it, as on a preemptable partition.
        "PreemptType=preempt/partition_prio",
        "PreemptMode=REQUEUE",
        "SlurmctldParameters=preempt_send_user_signal",  # PreemptParameters=send_user_signal from 23.02
        "PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120",
        "PartitionName=urgent Nodes=node[1-2] MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF",
        "",
    ])


def start(root: Path, timeout: float = 60) -> dict[str, str]:
    """Start the cluster under `root`; returns the environment clients need (SLURM_CONF)."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    munge = root / "munge"
    munge.mkdir(mode=0o700, exist_ok=True)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    for d in ("state", "spool"):
        (root / d).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(
        [_daemon("munged"), "--force", f"--key-file={key}", f"--socket={munge}/munge.socket",
         f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
        check=True, env=env,
    )
    subprocess.run([_daemon("slurmctld"), "-f", str(conf)], check=True, env=env)
    for node in NODES:
        subprocess.run([_daemon("slurmd"), "-f", str(conf), "-N", node], check=True, env=env)
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        if all(states.get(n) in ("idle", "mix", "alloc") for n in NODES):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-2000:] for p in root.glob("*.log"))
    stop(root)
    raise RuntimeError(f"the test Slurm cluster did not come up within {timeout}s:\n{logs}")


def stop(root: Path) -> None:
    """Stop what `start` started, by pid files (slurmd first, munge last)."""
    pidfiles = [root / f"slurmd.{n}.pid" for n in NODES] + [root / "slurmctld.pid", root / "munge" / "munged.pid"]
    for pidfile in pidfiles:
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        print(f"export SLURM_CONF={start(folder)['SLURM_CONF']}")
    else:
        stop(folder)
