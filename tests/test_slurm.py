"""The Slurm scripts (`mm1 submit` and slurm/*.sbatch) against a real two-node Slurm cluster
started on this machine (tests/slurm_cluster.py): a run to completion on both nodes, a
preemption (checkpoint, requeue, resume, the uninterrupted run's losses), a node that
never joins the rendezvous, the rendered script for mm1-30b on 64 x 8 GPUs with the planner's
memory check of its layout, and the conversion, evaluation and data-preparation scripts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from conftest import ROOT, colour_tasks, run

MM1 = [sys.executable, "-m", "megatron_mm1.cli"]
# Long enough (about a second a step) that the preemption test's urgent job, which Slurm has
# taken up to 9 s after the first step to act on, stops the run before its end.
STEPS = 20
TWO_NODES = ["--config", "tiny", "--nodes", "2", "--gpus-per-node", "1"]
TINY = [*TWO_NODES, "--steps", str(STEPS), "--set", "training.warmup_steps=2"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not slurm_cluster.available():
        if os.environ.get("CI"):
            pytest.fail("slurm-wlm and munge are not installed (.ci/run installs them)")
        pytest.skip("slurm-wlm and munge are not installed (apt-get install slurm-wlm munge)")
    root = tmp_path_factory.mktemp("slurm")
    env = slurm_cluster.start(root)
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(env)
    try:
        yield root
    finally:
        subprocess.run(["scancel", "--full", "--quiet", "--user", "root"], timeout=60)
        time.sleep(2)
        slurm_cluster.stop(root)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-data")
    run([*MM1, "data", "demo", "--out", str(out)])
    return out


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def describe(job_id: str, out: Path) -> str:
    """What a failed wait shows: the job's state and reason, the nodes, the job's logs."""
    info = job_info(job_id)
    fields = " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "Restarts", "RunTime", "NodeList"))
    nodes = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %t %E"], capture_output=True, text=True).stdout
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((out / "logs").glob("*")))
    return f"job {job_id}: {fields}\nnodes:\n{nodes}logs:\n{logs}"


def wait_job(job_id: str, out: Path, timeout: float = 360) -> dict[str, str]:
    end = time.time() + timeout
    while time.time() < end:
        info = job_info(job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    pytest.fail(f"did not end within {timeout}s: {describe(job_id, out)}")


def submit(data: Path, out: Path, *extra: str) -> str:
    proc = run([*MM1, "submit", *TINY, "--data", str(data), "--out", str(out), *extra])
    assert "squeue -j" in proc.stdout and "tail -f" in proc.stdout
    return proc.stdout.split()[-1]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def log(out: Path, job_id: str, restart: int) -> str:
    return (out / "logs" / f"{job_id}-restart{restart}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def whole_run(cluster, data, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("whole")
    job_id = submit(data, out)
    info = wait_job(job_id, out)
    assert info["JobState"] == "COMPLETED", (info, log(out, job_id, 0)[-3000:])
    return out, job_id


def test_two_nodes_to_completion(whole_run):
    out, job_id = whole_run
    text = log(out, job_id, 0)
    # Both nodes started their training process, and the run ended through its own record.
    assert "node node1" in text and "node node2" in text
    assert json.loads((out / "exit.json").read_text())["code"] == 0
    assert list(losses(out)) == list(range(1, STEPS + 1))
    # The records: rendered script, resolved config, exact command, the rendezvous for 2 nodes.
    assert (out / "train.sbatch").is_file() and (out / "config.yaml").is_file()
    command = (out / "command.sh").read_text()
    assert "--nodes=2" in command and "--ntasks-per-node=1" in command and "MASTER_PORT=" in command
    assert "--resume auto" in command and "training.steps=" not in command  # --steps passed as is
    assert not (out / "logs" / f"{job_id}-restart1.log").exists()


def wait_for_first_step(job_id: str, out: Path) -> None:
    end = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        assert time.time() < end and job_info(job_id)["JobState"] not in FINAL_STATES, describe(job_id, out)
        time.sleep(0.2)


def release_when_requeued(job_id: str, out: Path) -> None:
    """Wait until the job has requeued itself, then let it start at once: Slurm holds a requeued
    job for about two minutes (BeginTime)."""
    end = time.time() + 300
    while job_info(job_id).get("Restarts", "0") == "0" or job_info(job_id)["JobState"] != "PENDING":
        info = job_info(job_id)
        assert time.time() < end and info["JobState"] not in FINAL_STATES, describe(job_id, out)
        time.sleep(0.5)
    # ... once the old allocation is cleaned up on both nodes, and in a later second than the
    # requeue (slurmd refuses job credentials issued in the second the job was killed).
    while subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split() != ["idle"]:
        assert time.time() < end
        time.sleep(0.5)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=60)


def test_preemption_saves_requeues_and_resumes(whole_run, data, tmp_path):
    """A job of a higher-priority partition preempts the run (tests/slurm_cluster.py: GraceTime,
    PreemptMode=REQUEUE, the job's --signal sent at preemption, as before a time limit): the
    batch script gets SIGUSR1, the run saves at the next step boundary and exits 75, the job
    requeues itself once, and after the preempting job it resumes to the uninterrupted run's
    losses."""
    out = tmp_path / "split"
    job_id = submit(data, out)
    wait_for_first_step(job_id, out)
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--exclusive",
                             f"--output={tmp_path / 'urgent.out'}", "--wrap", "sleep 1"],
                            check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # Released only after the preempting job: started before it, the run would be preempted again.
    assert wait_job(urgent, out)["JobState"] == "COMPLETED"
    release_when_requeued(job_id, out)
    info = wait_job(job_id, out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info

    first, second = log(out, job_id, 0), log(out, job_id, 1)
    assert "USR1 received" in first and "exiting with 75" in first and "requeueing" in first
    step = int(re.search(r"saved \S+ at step (\d+)", first).group(1))
    assert f"resumed from {out / 'checkpoints' / f'step_{step:07d}'} at step {step}" in second
    assert "done" in second
    whole = losses(whole_run[0])
    split = losses(out)
    assert list(split) == list(range(1, STEPS + 1))  # every step once: saved at a step boundary
    assert split[STEPS] == whole[STEPS]  # the same final loss as the uninterrupted run, exactly
    assert split == whole


def test_node_that_never_starts_fails_the_rendezvous(cluster, data, tmp_path):
    timeout = 15
    out = tmp_path / "rdzv"
    proc = run([*MM1, "submit", *TINY, "--data", str(data), "--out", str(out),
                "--rdzv-timeout", str(timeout), "--max-restarts", "0", "--dry-run"])
    launch = '    exec "$PYTHON" -m megatron_mm1.cli train "$@"'
    assert launch in proc.stdout
    # The second node's task starts, but never its training process.
    script = proc.stdout.replace(launch, '    [ "$SLURM_NODEID" = 1 ] && exec sleep 600\n' + launch)
    (out / "logs").mkdir(parents=True)
    (out / "train.sbatch").write_text(script)
    job_id = subprocess.run(["sbatch", "--parsable", str(out / "train.sbatch")], check=True,
                            capture_output=True, text=True, timeout=60).stdout.strip()
    start = time.time()
    info = wait_job(job_id, out, timeout=timeout + 240)
    text = log(out, job_id, 0)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "124:0", (info, text[-3000:])
    assert "ERROR: rendezvous timeout: not all 2 nodes joined" in text
    assert f"RDZV_TIMEOUT={timeout} s" in text and "not requeued" in text
    started = re.search(r"node node1 .*starting 1 training process", text)
    assert started
    assert time.time() - start < timeout + 120


def test_dry_run_30b_on_64_nodes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.model").write_bytes(b"")
    out = tmp_path / "run"
    proc = run([*MM1, "submit", "--config", "mm1-30b", "--nodes", "64", "--gpus-per-node", "8",
                "--device", "gpu", "--data", str(data), "--out", str(out), "--time", "2-00:00:00",
                "--partition", "gpu", "--account", "proj", "--max-restarts", "5",
                "--set", "training.lr=1e-4", "--dry-run"])
    script = proc.stdout
    assert "world size 512, valid" in proc.stderr
    # The planner's check of the preset's own layout at 512 H100-80GB: it fits, no warning.
    assert re.search(r"planner \(mm1 plan\): layout tp4pp2dp64-mbs1 ~[\d.]+ GiB per GPU, fits 79\.6 GiB of a H100 SXM 80GB",
                     proc.stderr)
    assert "WARNING" not in proc.stderr
    assert script.startswith("#!/bin/bash\n") and not out.exists()  # nothing written
    sbatch = re.findall(r"^#SBATCH (\S+)", script, re.M)
    for line in ["--nodes=64", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=B:USR1@300",
                 "--requeue", "--time=2-00:00:00", "--partition=gpu", "--account=proj",
                 f"--output={out}/logs/%j.out"]:
        assert line in sbatch, (line, sbatch)
    assert "--qos" not in " ".join(sbatch)  # not given: stays off
    assert re.search(r"^GPUS_PER_NODE=8\b", script, re.M) and re.search(r"^DEVICE=gpu\b", script, re.M)
    assert "CONFIG=mm1-30b\n" in script and f"DATA={data}\n" in script and f"OUT={out}\n" in script
    assert "SETS=(training.lr=1e-4)\n" in script and "MAX_RESTARTS=5\n" in script
    # The launch line: one srun task per GPU on each of the NNODES (= SLURM_JOB_NUM_NODES = 64)
    # nodes, each a training process.
    assert 'SRUN=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE"' in script
    assert """"${SRUN[@]}" bash -c 'rank_main "$@"' rank_main "${TRAIN[@]}" &""" in script
    assert 'exec "$PYTHON" -m megatron_mm1.cli train "$@"' in script
    assert 'TRAIN=(--config "$CONFIG" --out "$OUT" --resume auto)' in script
    assert "scontrol requeue" in script and "torch.distributed.run" not in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    # The rendered command lines, as bash expands them on the allocation.
    expand = script.split("# ==== END OF RUN SETTINGS")[0] + (
        '\nSLURM_JOB_NUM_NODES=64; NNODES=64; SLURM_CPUS_ON_NODE=96\n'
        + re.search(r"^TRAIN=\(.*?^for item.*?\n", script, re.M | re.S).group(0)
        + re.search(r"^SRUN=\(.*?^\[ \"\$DEVICE\" = gpu \] && SRUN\+=.*?\n", script, re.M | re.S).group(0)
        + 'printf "%s\\n" "${SRUN[@]}" "${TRAIN[@]}"\n'
    )
    args = subprocess.run(["bash", "-c", expand], capture_output=True, text=True, check=True).stdout.split("\n")
    assert "--nodes=64" in args and "--ntasks-per-node=8" in args and "--gpus-per-node=8" in args
    assert "--cpus-per-task=12" in args and "--kill-on-bad-exit=1" in args
    train = args[args.index("--config"):]
    assert train[:4] == ["--config", "mm1-30b", "--out", str(out)]
    assert ["--data", str(data)] == train[train.index("--data"):train.index("--data") + 2]
    assert ["--set", "training.lr=1e-4"] == train[train.index("--set"):train.index("--set") + 2]


def test_dry_run_warns_when_the_layout_does_not_fit(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.model").write_bytes(b"")
    args = [*MM1, "submit", "--config", "mm1-30b", "--nodes", "8", "--gpus-per-node", "8", "--device", "gpu",
            "--data", str(data), "--out", str(tmp_path / "run"), "--dry-run"]
    tp1 = ["--set", "parallel.tensor_model_parallel_size=1", "--set", "parallel.pipeline_model_parallel_size=1",
           "--set", "parallel.sequence_parallel=false"]
    proc = run([*args, *tp1])  # a warning, not a refusal: exit 0 and the script
    assert proc.stdout.startswith("#!/bin/bash\n")
    warning = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: ")]
    assert len(warning) == 2, proc.stderr
    assert "layout tp1pp1dp64-mbs1 is estimated not to fit 64 x H100 SXM 80GB: needs" in warning[0]
    assert "--set parallel.tensor_model_parallel_size=4" in warning[1]  # the planner's best that fits
    assert re.search(r"world size 64, valid; planner \(mm1 plan\): layout tp1pp1dp64-mbs1 ~[\d.]+ GiB per GPU, "
                     r"does NOT fit 79\.6 GiB", proc.stderr)
    # --gpu-type: the preset's own layout fits 64 x H100-80GB, not 64 x A100-40GB.
    assert "WARNING" not in run(args).stderr
    assert "fit 64 x A100 SXM 40GB" in run([*args, "--gpu-type", "a100-40gb"]).stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "mm1-30b", "--nodes", "3", "--gpus-per-node", "4"], "world size 12 is not divisible"),
        (["--config", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--data", "/nonexistent/data"], "no such folder"),
        (["--config", "tiny", "--nodes", "1", "--gpus-per-node", "1"], "--data"),
        (["--config", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--set",
          "data.datasets=[{path: /nonexistent/laion, kind: caption}]"], "data.datasets[0].path=/nonexistent/laion: no such"),
    ],
    ids=["world-size", "missing-data", "no-data", "missing-listed-dataset"],
)
def test_refused_before_submitting(tmp_path, args, message):
    proc = run([*MM1, "submit", *args, "--out", str(tmp_path / "run"), "--device", "gpu"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("mm1 submit: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_convert_script_exports_the_newest_checkpoint(whole_run, tmp_path):
    out, _ = whole_run
    env = {**os.environ, "RUN": str(out), "HF_OUT": str(tmp_path / "hf"), "REPO": str(ROOT), "PYTHON": sys.executable}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/convert-%j.out", str(ROOT / "slurm" / "convert.sbatch")],
                          check=True, capture_output=True, text=True, env=env, timeout=60)
    job_id = proc.stdout.strip()
    info = wait_job(job_id, out)
    text = (tmp_path / f"convert-{job_id}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", (info, text[-3000:])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert f"checkpoints/{latest} -> {tmp_path / 'hf'}" in text and "done" in text
    assert (tmp_path / "hf" / "config.json").is_file()


def test_eval_script_answers_on_two_nodes_as_one_process_does(whole_run, tmp_path):
    """slurm/eval.sbatch, its cluster block set for CPUs as an operator would: `mm1 eval` over
    both nodes (two data-parallel replicas meeting at the first node) scores the run's newest
    checkpoint, and each item's answer is the one a single local process gives."""
    out, _ = whole_run
    kinds = colour_tasks(tmp_path)
    script = (ROOT / "slurm" / "eval.sbatch").read_text()
    for gpu, cpu in (("#SBATCH --gpus-per-node=8", "##SBATCH --gpus-per-node=8"),
                     ("#SBATCH --ntasks-per-node=8", "#SBATCH --ntasks-per-node=1"),
                     ("GPUS_PER_NODE=8 ", "GPUS_PER_NODE=1 "), ("DEVICE=gpu ", "DEVICE=cpu ")):
        assert gpu in script
        script = script.replace(gpu, cpu, 1)
    (tmp_path / "eval.sbatch").write_text(script)
    tasks = " ".join(f"{k}:{tmp_path / k}.jsonl" for k in kinds)
    env = {**os.environ, "RUN": str(out), "TASKS": tasks, "SHOTS": "1", "MAX_NEW_TOKENS": "3", "BATCH_SIZE": "2",
           "EVAL_OUT": str(tmp_path / "slurm-eval"), "REPO": str(ROOT), "PYTHON": sys.executable}
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={tmp_path}/eval-%j.out",
                           str(tmp_path / "eval.sbatch")], check=True, capture_output=True, text=True, env=env, timeout=60)
    job_id = proc.stdout.strip()
    info = wait_job(job_id, out)
    text = (tmp_path / f"eval-{job_id}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", (info, text[-3000:])
    assert '"data_parallel_size": 2' in text and "done" in text  # the dry run's check, then the job
    run([*MM1, "eval", "--checkpoint", str(out), "--shots", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "local"),
         *(a for k in kinds for a in ("--task", f"{k}:{tmp_path / k}.jsonl"))])
    answers = {folder: [json.loads(line)["prediction"] for line in (tmp_path / folder / "predictions.jsonl").read_text().splitlines()]
               for folder in ("slurm-eval", "local")}
    assert answers["slurm-eval"] == answers["local"] and len(answers["local"]) == 6


def test_prepare_on_slurm_array_and_merge_give_the_one_process_folder(cluster, tmp_path):
    """`mm1 data prepare --slurm 2` renders slurm/prepare.sbatch and submits it as a two-task
    array: each task prepares its units, the merge job the first task queued combines them, and
    the folder is byte for byte the one a single local `mm1 data prepare` writes."""
    from megatron_mm1.data.demo import write_corpus

    corpus = write_corpus(tmp_path, num_captions=30, num_interleaved=10, num_text=10, seed=3)
    prepare = [*MM1, "data", "prepare", "--input", str(corpus), "--images", str(corpus.parent / "images"),
               "--unit-samples", "8", "--quiet"]
    run([*prepare, "--out", str(tmp_path / "local")])
    rendered = run([*prepare, "--out", str(tmp_path / "slurm"), "--slurm", "2", "--dry-run"]).stdout
    assert "#SBATCH --array=0-1 " in rendered and "NUM_TASKS=2\n" in rendered and not (tmp_path / "slurm").exists()
    array = run([*prepare, "--out", str(tmp_path / "slurm"), "--slurm", "2", "--cpus-per-task", "1"]).stdout.split()[-1]
    logs = tmp_path / "slurm-logs"
    end = time.time() + 240
    while not (merged := re.search(r"merge job (\d+) queued", "".join(
            p.read_text(errors="replace") for p in logs.glob(f"{array}_*.out")))):
        assert time.time() < end, describe(array, tmp_path)
        time.sleep(1)
    info = wait_job(merged.group(1), tmp_path)
    text = "\n".join(p.read_text(errors="replace")[-2000:] for p in [*logs.glob("*.out"), *tmp_path.glob("*.out")])
    assert info["JobState"] == "COMPLETED", (info, text)
    assert "task 0 of 2" in text and "task 1 of 2" in text

    def tree(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    assert tree(tmp_path / "slurm") == tree(tmp_path / "local")
