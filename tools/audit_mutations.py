"""Put device mistakes back into a copy of the repository and show the device audit catching each.

Each mutation undoes one placement (a collective's tensor made on the host, as the code once
had it; a module built off the device; batches never moved), runs a short command under
MM1_DEVICE_AUDIT=1 in the copy, and reports the audit's message. Exit 1 if any mistake passes.

    .venv/bin/python tools/audit_mutations.py [--data DIR] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MM1 = [sys.executable, "-m", "megatron_mm1.cli"]

# name: (file, the correct code, the mistake, which command shows it)
MUTATIONS = {
    "reduce_metrics: DP all-reduce": (
        "megatron_mm1/engine_base.py",
        "values = torch.zeros(len(names), dtype=torch.float64, device=device())",
        "values = torch.zeros(len(names), dtype=torch.float64)",
        "train"),
    "reduce_metrics: PP all-reduce": (
        "megatron_mm1/engine_base.py",
        "    # Only the last pipeline stage holds losses: a sum over PP shares them.\n",
        "    values = values.cpu()\n",
        "train"),
    "_all_finite": (
        "megatron_mm1/engine.py",
        'finite = torch.tensor([1.0 if math.isfinite(loss) else 0.0], device=device())',
        'finite = torch.tensor([1.0 if math.isfinite(loss) else 0.0])',
        "train"),
    "StopSignal.any_rank": (
        "megatron_mm1/train.py",
        "flag = torch.tensor([1.0 if self.received else 0.0], device=device())",
        "flag = torch.tensor([1.0 if self.received else 0.0])",
        "train"),
    "_count": (
        "megatron_mm1/train.py",
        "total = torch.tensor(counts, dtype=torch.float64, device=device())",
        "total = torch.tensor(counts, dtype=torch.float64)",
        "train"),
    "benchmark: work": (
        "megatron_mm1/benchmark.py",
        "        dtype=torch.float64,\n        device=device(),\n    )",
        "        dtype=torch.float64,\n    )",
        "benchmark"),
    "benchmark: step times": (
        "megatron_mm1/benchmark.py",
        "times = torch.tensor([step()[0] for _ in range(steps)], dtype=torch.float64, device=device())",
        "times = torch.tensor([step()[0] for _ in range(steps)], dtype=torch.float64)",
        "benchmark"),
    "benchmark: peak memory": (
        "megatron_mm1/benchmark.py",
        "memory = torch.tensor([peak_memory], dtype=torch.float64, device=device())",
        "memory = torch.tensor([peak_memory], dtype=torch.float64)",
        "benchmark"),
    "model built off the device": (
        "megatron_mm1/models/mm1.py",
        "    with torch.device(device()):\n",
        "    with torch.device('cpu'):\n",
        "train"),
    "batches left on the host": (
        "megatron_mm1/train.py",
        "batches = [to_device(b) for b in host]",
        "batches = host",
        "train"),
}


def commands(data: Path, out: Path) -> dict[str, list[str]]:
    return {
        "train": [*MM1, "train", "--config", "tiny", "--data", str(data), "--out", str(out), "--steps", "1",
                  "--nproc", "1", "--set", "training.warmup_steps=1"],
        "benchmark": [*MM1, "benchmark", "--config", "tiny", "--steps", "1", "--warmup", "1",
                      "--images-per-seq", "2", "--peak-tflops", "0.05"],
    }


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a demo corpus (default: made with `mm1 data demo`)")
    ap.add_argument("--only", help="run the mutations whose name contains this")
    args = ap.parse_args()
    env = {**os.environ, "MM1_DEVICE_AUDIT": "1", "OMP_NUM_THREADS": "1"}
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "data"
            subprocess.run([*MM1, "data", "demo", "--out", str(data)], cwd=ROOT, check=True, capture_output=True)
        print("| mistake put back | file | command | exit | the audit's message |\n|---|---|---|---|---|")
        for name, (path, right, wrong, command) in MUTATIONS.items():
            if args.only and args.only not in name:
                continue
            repo = tmp / "repo"
            shutil.rmtree(repo, ignore_errors=True)
            copy_repo(repo)
            source = (repo / path).read_text()
            if source.count(right) != 1:
                raise SystemExit(f"{name}: the correct code is no longer in {path} exactly once; update MUTATIONS")
            (repo / path).write_text(source.replace(right, wrong))
            shutil.rmtree(tmp / "out", ignore_errors=True)
            proc = subprocess.run(commands(data.resolve(), tmp / "out")[command], cwd=repo, env=env,
                                  capture_output=True, text=True, timeout=900)
            output = proc.stdout + proc.stderr
            found = re.search(r"(?:DeviceMismatch|RuntimeError): (device audit: [^\n]*|\d+ parameters/buffers are not on [^\n]*)", output)
            caught = proc.returncode != 0 and found is not None
            missed += not caught
            message = found.group(1) if found else "NOT CAUGHT: " + " / ".join(output.strip().splitlines()[-2:])
            print(f"| {name} | {path} | mm1 {command} | {proc.returncode} | {message.replace('|', '/')} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
