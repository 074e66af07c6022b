"""`mm1 train` end to end on the demo corpus with real processes: exact resume, resume at
another layout, SIGTERM, kill -9 during a save, NaN/Inf safety, metrics and tensorboard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run

from megatron_mm1.checkpoint import complete_checkpoints, latest_checkpoint, verify_checkpoint
from megatron_mm1.watchdog import EXIT_HUNG

TP2PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
          "parallel.sequence_parallel=true"]
# Four processes: PP2 x DP2 with EP2; the virtual stages leave pipeline stage 1 without an MoE
# layer (layers 1 and 3), so its ranks' expert optimizer holds no parameter.
PP2VPP2EP2 = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
              "parallel.expert_model_parallel_size=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-data")
    run([sys.executable, "-m", "megatron_mm1.cli", "data", "demo", "--out", str(out)])
    return out


def train_cmd(data, out, steps, nproc, sets=(), config="tiny", resume=None, args=()):
    cmd = [sys.executable, "-m", "megatron_mm1.cli", "train", "--config", config, "--data", str(data),
           "--out", str(out), "--steps", str(steps), "--nproc", str(nproc), *args]
    if resume:
        cmd += ["--resume", resume]
    for item in ["training.warmup_steps=2", *sets]:
        cmd += ["--set", item]
    return cmd


def train(data, out, steps, nproc, sets=(), config="tiny", resume=None, expect=0, args=()):
    proc = run(train_cmd(data, out, steps, nproc, sets, config, resume, args), check=False)
    if proc.returncode != expect:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"mm1 train exited {proc.returncode}, expected {expect}:\n{tail}")
    return proc


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in rows(out) if "loss" in r}  # not the step-0 validation row


def valid_losses(out):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("valid_loss")} for r in rows(out) if "valid_loss" in r}


@pytest.fixture(scope="module")
def dense_tp2pp2_run(data, tmp_path_factory):
    """4 uninterrupted steps at TP2 x PP2 with SP and the distributed optimizer."""
    out = tmp_path_factory.mktemp("dense-tp2pp2")
    train(data, out, 4, 4, TP2PP2)
    return out


def check_exact_resume(data, whole, split, config, nproc, layout, first_half=()) -> str:
    """Stop after step 2 (as a requeued job does), resume: the same 4 losses, bit for bit. The
    first half's output."""
    proc = train(data, split, 4, nproc, [*layout, "training.exit_after_steps=2", *first_half], config, expect=75)
    assert list(losses(split)) == [1, 2]
    train(data, split, 4, nproc, layout, config, resume="auto")
    assert list(losses(split)) == [1, 2, 3, 4]
    assert losses(split) == losses(whole)  # bit-identical, not merely close
    assert losses(whole)[4] < losses(whole)[1]
    return proc.stdout + proc.stderr


def test_exact_resume_dense_tp2pp2(data, tmp_path, dense_tp2pp2_run):
    # The first half saves in the background (forked writers, distributed optimizer state
    # included) at every step; the stop's save waits for the one in flight, then for its own.
    split = tmp_path / "split"
    output = check_exact_resume(data, dense_tp2pp2_run, split, "tiny", 4, TP2PP2,
                                ["checkpoint.async_save=true", "checkpoint.save_interval=1"])
    assert f"saved {split / 'checkpoints' / 'step_0000001'} (written in the background)" in output
    assert f"saved {split / 'checkpoints' / 'step_0000002'} at step 2" in output
    assert all(0 <= r["checkpoint_s"] < 60 for r in rows(split)[:1])
    # The writers' checksums went into the manifests, and the files they were passed in are gone.
    assert verify_checkpoint(split / "checkpoints" / "step_0000001") == []
    assert not list((split / "checkpoints").rglob("*.sha256"))


def test_exact_resume_moe_pp2_vpp2_ep2_and_the_validation_loss_at_other_layouts(data, tmp_path):
    # Validation on 10% held out: the uninterrupted run evaluates before step 1 and after step 4
    # only, the split run also after steps 1, 2 and 3 (forward-only through the interleaved
    # pipeline schedule, experts in parallel). Training's losses stay bit-identical, and so do
    # the validation losses they share.
    whole, split = tmp_path / "whole", tmp_path / "split"
    valid = ["data.valid_fraction=0.1", "training.eval_iters=1"]
    train(data, whole, 4, 4, [*PP2VPP2EP2, *valid, "training.eval_interval=100"], "tiny-moe")
    check_exact_resume(data, whole, split, "tiny-moe", 4, [*PP2VPP2EP2, *valid, "training.eval_interval=1"])
    assert list(valid_losses(whole)) == [0, 4] and list(valid_losses(split)) == [0, 1, 2, 3, 4]
    for step in (0, 4):
        assert valid_losses(split)[step] == valid_losses(whole)[step]
    assert set(valid_losses(whole)[4]) == {"valid_loss", "valid_loss_interleaved", "valid_loss_caption", "valid_loss_text"}
    # The same weights evaluated in one process and at TP2 (a fine-tuning run's step-0
    # validation): the same losses, up to float32 summation order.
    final = whole / "checkpoints" / "step_0000004"
    for nproc, layout in [(1, []), (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"])]:
        out = tmp_path / f"tp{nproc}"
        train(data, out, 1, nproc, [*layout, *valid, f"checkpoint.finetune_from={final}"], "tiny-moe")
        assert valid_losses(out)[0] == pytest.approx(valid_losses(whole)[4], rel=1e-5)


def test_a_three_dataset_mixture_resumes_exactly(data, tmp_path):
    """Captions from three prepared folders (the demo's, weight 1, and two more, weights 2 and 1,
    named in data.datasets) beside the demo's interleaved and text data, DP2: every dataset is
    drawn from, and a run stopped after step 2 and resumed gives the uninterrupted run's losses
    bit for bit."""
    from megatron_mm1.data.demo import write_corpus

    folders = {}
    for name, seed in (("coyo", 11), ("laion", 12)):
        corpus = write_corpus(tmp_path / f"{name}-raw", num_captions=60, num_interleaved=0, num_text=0, seed=seed)
        folders[name] = tmp_path / name
        run([sys.executable, "-m", "megatron_mm1.cli", "data", "prepare", "--input", str(corpus),
             "--images", str(corpus.parent / "images"), "--out", str(folders[name]), "--quiet"])
    mixture = [f"data.datasets=[{{path: {folders['coyo']}, kind: caption, weight: 2.0}}, "
               f"{{path: {folders['laion']}, kind: caption}}]"]
    train(data, tmp_path / "whole", 4, 2, mixture)
    check_exact_resume(data, tmp_path / "whole", tmp_path / "split", "tiny", 2, mixture)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_0000004" / "data" / "dp0.json").read_text())
    assert sorted(state["datasets"]) == sorted(f"{folder}:{kind}" for folder, kind in [
        (data, "caption"), (data, "interleaved"), (data, "text"), (folders["coyo"], "caption"),
        (folders["laion"], "caption")])
    assert all(cursor > 0 for cursor in state["mixture"]["cursors"])


def test_resume_at_another_layout(data, tmp_path):
    # A non-distributed optimizer's state reshards like the weights: the whole run continues.
    sets = ["training.distributed_optimizer=false", "checkpoint.save_interval=2"]
    train(data, tmp_path / "a", 5, 4, [*TP2PP2, *sets])
    ckpt2 = tmp_path / "a" / "checkpoints" / "step_0000002"
    assert ckpt2.is_dir()
    train(data, tmp_path / "b", 5, 1, sets, resume=str(ckpt2))  # TP1 x PP1
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(b) == [3, 4, 5]
    for step in (3, 4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=0), (step, a, b)
    # ... and back: TP1 x PP1 -> TP2 x PP2.
    ckpt4 = tmp_path / "b" / "checkpoints" / "step_0000004"
    train(data, tmp_path / "c", 5, 4, [*TP2PP2, *sets], resume=str(ckpt4))
    assert losses(tmp_path / "c")[5] == pytest.approx(b[5], rel=1e-5, abs=0)


def test_distributed_optimizer_state_is_refused_at_another_layout(data, tmp_path, dense_tp2pp2_run):
    # The distributed optimizer's state does not reshard over TP/PP: a clear refusal, and the
    # weights alone load.
    ckpt = str(dense_tp2pp2_run / "checkpoints" / "step_0000004")
    proc = train(data, tmp_path, 5, 1, resume=ckpt, expect=2)
    assert "checkpoint.load_optimizer=false" in proc.stderr
    # The weights alone load; 5 steps instead of the run's 4 is a new schedule, and refused
    # unless asked for.
    proc = train(data, tmp_path, 5, 1, ["checkpoint.load_optimizer=false"], resume=ckpt, expect=2)
    assert "lr_decay_steps (training.steps) 4 -> 5" in proc.stderr and "--new-schedule" in proc.stderr
    assert json.loads((tmp_path / "exit.json").read_text())["code"] == 2  # Slurm does not requeue it
    train(data, tmp_path, 5, 1, ["checkpoint.load_optimizer=false"], resume=ckpt, args=["--new-schedule"])
    assert list(losses(tmp_path)) == [5]


def _wait_for(predicate, timeout=180.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [d for c in children for d in _descendants(c)]


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed process stays a zombie until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it ended between listing and signalling


def _freeze_tree(pid: int) -> list[int]:
    """SIGSTOP `pid` and all its descendants, including any forked while stopping them (a
    stopped process forks no more, so the listing ends); returns them all."""
    stopped: list[int] = []
    while new := [p for p in [pid, *_descendants(pid)] if p not in stopped]:
        _signal_all(new, signal.SIGSTOP)
        stopped += new
    return stopped


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_steps(out, count: int) -> None:
    assert _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(rows(out)) >= count)


def _assert_saved_for_requeue(proc, out) -> dict:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    record = json.loads((out / "exit.json").read_text())
    assert record["code"] == 75 and "signal received" in record["message"]
    path = latest_checkpoint(out / "checkpoints")
    assert path is not None and path.name == f"step_{record['step']:07d}"
    return record


def test_sigterm_to_one_rank_saves_and_exits_for_requeue(data, tmp_path):
    out = tmp_path / "run"
    proc = _start(train_cmd(data, out, 500, 2, ["parallel.tensor_model_parallel_size=2"]))
    _wait_for_steps(out, 2)
    # A signal that reaches one rank only (Slurm signals every process; an operator may signal
    # one): the ranks agree at the next step boundary.
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)
    _assert_saved_for_requeue(proc, out)  # it loads: test_kill_during_save... resumes one


def test_ctrl_c_to_the_launcher_saves_and_exits_for_requeue(data, tmp_path):
    out = tmp_path / "run"
    proc = _start(train_cmd(data, out, 500, 2, ["parallel.tensor_model_parallel_size=2"]))
    _wait_for_steps(out, 2)
    tree = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGINT)  # the launcher alone: it passes the signal to every rank
    _assert_saved_for_requeue(proc, out)
    assert not [p for p in tree if _alive(p)]


def test_kill_9_of_one_rank_ends_the_whole_run(data, tmp_path):
    out = tmp_path / "run"
    proc = _start(train_cmd(data, out, 500, 2, ["parallel.tensor_model_parallel_size=2"]))
    _wait_for_steps(out, 2)
    tree = _descendants(proc.pid)  # the ranks, their data-loader workers, checkpoint helpers
    ranks = _children(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)  # at once: its peers wait in a collective
    assert proc.returncode == 128 + signal.SIGKILL, output[-3000:]
    assert not [p for p in tree if _alive(p)]


def test_a_hung_rank_ends_the_run_with_stacks(data, tmp_path):
    out = tmp_path / "run"
    # 30 s: start-up on two busy cores must stay within the collectives' timeout (30 + 60 s).
    proc = _start(train_cmd(data, out, 500, 2, ["parallel.tensor_model_parallel_size=2", "training.hang_timeout_s=30"]))
    _wait_for_steps(out, 2)
    tree = _descendants(proc.pid)
    os.kill(_children(proc.pid)[1], signal.SIGSTOP)  # rank 1 hangs; rank 0 waits for it
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_HUNG, output[-3000:]
    stacks = (out / "hang-0.txt").read_text()
    assert "no training step finished" in stacks and "megatron_mm1/train.py" in stacks
    record = json.loads((out / "exit.json").read_text())
    assert record["code"] == EXIT_HUNG and record["step"] >= 2 and "hang-0.txt" in record["message"]
    assert not [p for p in tree if _alive(p)]  # the stopped rank too


def test_kill_during_save_never_leaves_a_half_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    proc = _start(train_cmd(data, out, 500, 2, ["parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=1"]))
    root = out / "checkpoints"

    def save_in_flight() -> bool:
        return len(complete_checkpoints(root)) >= 1 and any(p.name.startswith(".tmp-") for p in root.iterdir())

    # Freeze the whole tree (the launcher starts its workers in sessions of their own) while a
    # save is in flight after at least one completed; the check is repeated on the frozen tree
    # because a save can finish between seeing its folder and stopping the processes.
    for _ in range(20):
        assert _wait_for(save_in_flight)
        pids = _freeze_tree(proc.pid)
        if save_in_flight():
            break
        _signal_all(pids, signal.SIGCONT)
    else:
        pytest.fail("never caught a save in flight")
    _signal_all(pids, signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the interrupted save
    for path in complete_checkpoints(root):
        assert (path / "train_state.json").is_file() and (path / "model" / "metadata.json").is_file()
        assert (path / "optimizer" / "metadata.json").is_file() and (path / "config.yaml").is_file()
    resumed_from = latest_checkpoint(root)
    proc = train(data, out, 500, 2, ["parallel.tensor_model_parallel_size=2", "training.exit_after_steps=1"],
                 resume="auto", expect=75)
    assert f"resumed from {resumed_from}" in proc.stdout
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumed(data, tmp_path):
    out = tmp_path / "run"
    sets = ["parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=1"]
    train(data, out, 3, 2, sets)
    root = out / "checkpoints"
    shard = root / "step_0000003" / "optimizer" / "__1_0.distcp"  # written by rank 1
    data_bytes = shard.read_bytes()
    shard.write_bytes(data_bytes[:-100])
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "checkpoint", "verify", str(out)], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"optimizer/__1_0.distcp has {len(data_bytes) - 100} bytes, {len(data_bytes)} were saved" in proc.stdout
    assert f"--resume auto would resume from {root / 'step_0000002'}" in proc.stdout
    # A flipped bit keeps the size: the checksum finds it. An explicit --resume is refused.
    flipped = bytearray(data_bytes)
    flipped[len(flipped) // 2] ^= 1
    shard.write_bytes(flipped)
    proc = train(data, out, 3, 2, sets, resume=str(root / "step_0000003"), expect=2)
    assert "optimizer/__1_0.distcp differs from what was saved" in proc.stderr
    # --resume auto sets it aside, says so, and resumes from the one before: step 3 again.
    proc = train(data, out, 3, 2, sets, resume="auto")
    assert "step_0000003 is damaged: optimizer/__1_0.distcp differs" in proc.stderr
    assert f"resumed from {root / 'step_0000002'} at step 2" in proc.stdout
    assert (root / "damaged-step_0000003" / "optimizer" / "__1_0.distcp").read_bytes() == flipped
    assert [r["step"] for r in rows(out)] == [1, 2, 3]  # step 3's first row gave way to its rerun
    assert run([sys.executable, "-m", "megatron_mm1.cli", "checkpoint", "verify", str(root / "step_0000003")]).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 14 MiB tmpfs: room for one tiny TP2 checkpoint (8.4 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs (CI runs as root): {mounted.stderr}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(data, tmp_path, small_disk, background):
    import shutil

    out = small_disk / "run"
    sets = ["parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=1", "checkpoint.keep_last=1"]
    proc = train(data, out, 4, 2, [*sets, f"checkpoint.async_save={str(background).lower()}"], expect=74)
    record = json.loads((out / "exit.json").read_text())
    # A background write that fails is found at the next step boundary.
    assert record["code"] == 74 and record["step"] in ([2, 3] if background else [2])
    for text in (record["message"], proc.stdout):
        assert "saving the checkpoint of step 2 failed" in text and "the disk is full" in text
        assert "the previous checkpoint is intact" in text
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]  # the partial save removed
    # The previous checkpoint loads: the run goes on from it where there is room (once: it does
    # not depend on how the failed save was written).
    if not background:
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
        train(data, moved, 4, 2, sets, resume="auto")
        assert [r["step"] for r in rows(moved)] == [1, 2, 3, 4]


def test_one_run_per_folder(data, tmp_path):
    out = tmp_path / "run"
    sets = ["parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=1"]
    first = _start(train_cmd(data, out, 500, 2, sets))
    _wait_for_steps(out, 1)
    rank0 = _children(first.pid)[0]
    # A second run on the folder, while the first trains: refused, naming the holder.
    proc = train(data, out, 500, 2, sets, resume="auto", expect=2)
    assert f"is in use by another run (pid {rank0} on " in proc.stderr
    assert proc.stderr.count("is in use") == 1  # said once, not by every rank
    assert first.poll() is None
    # kill -9 of the first run's launcher (its ranks die with it) leaves the lock file behind,
    # but no lock: the kernel dropped it with its holder.
    tree = _descendants(first.pid)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert _wait_for(lambda: not [p for p in tree if _alive(p)], timeout=10)
    assert (out / "run.lock").is_file()
    # A new run into the folder without --resume: past the stale lock file, refused (one process
    # will do: rank 0 decides). A changed schedule: test_distributed_optimizer_state_is_refused...
    proc = train(data, out, 500, 1, expect=2)
    assert "already holds a run" in proc.stderr and "--resume auto" in proc.stderr


def test_nonfinite_steps_are_skipped_then_the_run_stops(data, tmp_path):
    out = tmp_path / "run"
    proc = train(data, out, 20, 1, ["training.lr=1e5", "training.max_nonfinite_steps=2"], expect=3)
    record = json.loads((out / "exit.json").read_text())
    assert record["code"] == 3 and "NaN/Inf" in record["message"] and "NaN/Inf" in proc.stdout
    history = rows(out)
    assert history[-1]["skipped_steps"] == 2
    assert history[-1]["step"] == record["step"] < 20
    # The saved state is the last good one: resuming it gives a finite loss.
    path = latest_checkpoint(out / "checkpoints")
    assert json.loads((path / "train_state.json").read_text())["counters"]["skipped_steps"] == 2


def test_metrics_and_tensorboard(data, tmp_path):
    out = tmp_path / "run"
    train(data, out, 3, 2, ["parallel.pipeline_model_parallel_size=2", "model.logits_z_loss_coeff=1e-4",
                            "training.peak_tflops=0.01", "training.bf16=true"], config="tiny-moe")
    row = rows(out)[-1]
    for key in ("step", "loss", "lm_loss", "logits_z_loss", "lr", "grad_norm", "tokens_per_s",
                "tflops_per_gpu", "mfu", "moe_load_balancing_loss", "moe_z_loss", "skipped_steps", "skipped_images"):
        assert key in row, key
    assert row["skipped_images"] == 0  # intact data (tests/test_data_loader.py damages some)
    assert row["loss"] == pytest.approx(row["lm_loss"] + row["logits_z_loss"])
    assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(row["tokens"])
    assert 0 < row["tokens"] <= 8 * 128  # global batch 8 x 128 positions, padding excluded
    assert row["mfu"] == pytest.approx(row["tflops_per_gpu"] / 0.01)
    assert row["moe_load_balancing_loss"] > 0.5  # ~1 for balanced routing, before its coefficient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/moe_load_balancing_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
