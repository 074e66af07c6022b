"""Checkpoint folders without a model: which rank checksums which file, the manifest and its
check, the order --resume auto tries checkpoints in, and what `--checkpoint PATH` names; and a
write that fails on one rank of a real two-process megatron-core save. (tests/test_train.py
damages real checkpoints of real runs.)"""

import contextlib
import errno
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from megatron_mm1.checkpoint import (BackgroundSaves, RanksFailed, SaveFailed, _shares, begin_save,
                                     checkpoint_folders, finish_save, intact_checkpoint, resume_candidates,
                                     save_sharded, verify_checkpoint, write_manifest)
from megatron_mm1.config import ConfigError


def test_each_file_is_checksummed_once_by_its_writer_or_the_least_loaded_rank():
    sizes = {"model/__0_0.distcp": 100, "model/__1_0.distcp": 100, "model/__1_1.distcp": 100,
             "rng/rank0.pt": 10, "rng/rank1.pt": 10, "deepspeed/a.pt": 300, "deepspeed/b.pt": 50,
             "config.yaml": 5, "model/__7_0.distcp": 40}  # rank 7: a larger world saved it
    shares = _shares(sizes, 2)
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    assert {"model/__0_0.distcp", "rng/rank0.pt"} <= set(shares[0])
    assert {"model/__1_0.distcp", "model/__1_1.distcp", "rng/rank1.pt"} <= set(shares[1])
    # The rest, largest first, to whichever rank has read the fewest bytes so far.
    assert "deepspeed/a.pt" in shares[0] and "deepspeed/b.pt" in shares[1]
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(sizes.values())


def _checkpoint(root, name: str, payload: bytes = b"weights"):
    path = root / name
    (path / "model").mkdir(parents=True)
    (path / "config.yaml").write_text("model: {}\n")
    (path / "model" / "__0_0.distcp").write_bytes(payload)
    (path / "train_state.json").write_text("{}")
    write_manifest(path)
    return path


def test_the_manifest_finds_a_missing_truncated_or_changed_file(tmp_path):
    path = _checkpoint(tmp_path, "step_0000001", os.urandom(1000))
    assert verify_checkpoint(path) == []
    shard = path / "model" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert verify_checkpoint(path) == ["model/__0_0.distcp differs from what was saved (SHA-256)"]
    assert verify_checkpoint(path, only="config") == []  # what conversion reads: model/ alone
    shard.write_bytes(data[:10])
    assert verify_checkpoint(path) == ["model/__0_0.distcp has 10 bytes, 1000 were saved"]
    shard.unlink()
    assert verify_checkpoint(path) == ["model/__0_0.distcp is missing"]
    (path / "manifest.json").write_text("{")
    assert verify_checkpoint(path)[0].startswith("manifest.json is unreadable")
    (path / "manifest.json").unlink()
    assert verify_checkpoint(path) == ["manifest.json is missing"]


def test_resume_auto_tries_latest_then_older_ones_never_an_abandoned_branch(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _checkpoint(root, f"step_{step:07d}")
    assert [p.name for p in resume_candidates(root)] == ["step_0000008", "step_0000006", "step_0000004", "step_0000002"]
    # The run was resumed from step 4 and saved step 6 again: step 8 is from the abandoned branch.
    (root / "latest").write_text("step_0000006\n")
    assert [p.name for p in resume_candidates(root)] == ["step_0000006", "step_0000004", "step_0000002"]


def test_a_checkpoint_argument_names_one_checkpoint_or_a_runs_newest_intact_one(tmp_path, capsys):
    run = tmp_path / "run"
    older = _checkpoint(run / "checkpoints", "step_0000002")
    newest = _checkpoint(run / "checkpoints", "step_0000004")
    assert checkpoint_folders(newest) == [newest]
    assert checkpoint_folders(run) == checkpoint_folders(run / "checkpoints") == [newest, older]
    (run / "config.yaml").write_text("{}")  # a Slurm job's record of the resolved config
    assert checkpoint_folders(run) == [newest, older]
    assert intact_checkpoint(run) == newest
    (newest / "model" / "__0_0.distcp").write_bytes(b"damaged")
    assert intact_checkpoint(run) == older
    assert f"passing over {newest}, damaged: model/__0_0.distcp differs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is damaged: model/__0_0.distcp differs"):
        intact_checkpoint(newest)
    (older / "model" / "__0_0.distcp").unlink()
    with pytest.raises(ConfigError, match="no intact checkpoint in"):
        intact_checkpoint(run)
    with pytest.raises(ConfigError, match="is not an MM1 checkpoint"):
        checkpoint_folders(tmp_path / "nothing")


def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    from conftest import torchrun

    proc = torchrun(2, "tests/test_checkpoint.py", str(tmp_path), timeout=300)
    assert proc.stdout.count("FAILS_TOGETHER_OK") == 2, proc.stdout


# Each write that megatron's save does on one rank alone, made to fail there (a full disk). The
# other rank must not wait for it forever in megatron's next collective.
MEGATRON = "megatron.core.dist_checkpointing"
ONE_RANK_FAULTS = {
    "common.pt": (0, f"{MEGATRON}.strategies.common.TorchCommonSaveStrategy.save_common"),
    "a shard": (1, f"{MEGATRON}.strategies.filesystem_async._write_item"),
    ".metadata": (0, f"{MEGATRON}.strategies.filesystem_async.FileSystemWriterAsync.finish"),
    "metadata.json": (0, f"{MEGATRON}.core.save_config"),
}


def _tiny_state(fill: float) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return {"weight": ShardedTensor.from_rank_offsets("weight", torch.full((4,), fill), (0, rank, world)), "step": 7}


def _save_as_training_does(root: Path, step: int, background: bool) -> Path:
    tmp = begin_save(root, step)
    rank = torch.distributed.get_rank()
    if not background:
        save_sharded(_tiny_state(float(rank)), tmp / "model")
        return finish_save(root, tmp, step, keep_last=1)
    saves = BackgroundSaves()
    saves.start([save_sharded(_tiny_state(float(rank)), tmp / "model", background=True)], root, tmp, step, 1)
    return saves.poll(wait=True)


def _fail_on_one_rank_then_save(root: Path) -> None:
    from megatron.core import dist_checkpointing

    rank, step = torch.distributed.get_rank(), 0
    for background in (False, True):
        for where, (failing, target) in ONE_RANK_FAULTS.items():
            step += 1
            fault = mock.patch(target, side_effect=OSError(errno.ENOSPC, f"injected at {where}"))
            with fault if rank == failing else contextlib.nullcontext():
                with pytest.raises((RanksFailed, SaveFailed), match=f"rank {failing}: .*injected at {where}"):
                    _save_as_training_does(root, step, background)
    # The ranks are still in step: a save after all that works and loads.
    for background in (False, True):
        step += 1
        saved = _save_as_training_does(root, step, background)
        loaded = dist_checkpointing.load(_tiny_state(-1.0), str(saved / "model"))
        assert loaded["step"] == 7 and torch.equal(loaded["weight"], torch.full((4,), float(rank)))
    print("FAILS_TOGETHER_OK", rank, flush=True)


if __name__ == "__main__":
    from megatron_mm1.config import load_config
    from megatron_mm1.runtime import init_runtime, quiet_third_party_warnings, shutdown

    quiet_third_party_warnings()
    init_runtime(load_config("tiny"))
    _fail_on_one_rank_then_save(Path(sys.argv[1]))
    shutdown()
