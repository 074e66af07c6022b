"""Checkpoint folders without a model: which rank checksums which file, the manifest and its
check, the order --resume auto tries checkpoints in, and what `--checkpoint PATH` names.
(tests/test_train.py damages real checkpoints of real runs.)"""

import os

import pytest

from megatron_mm1.checkpoint import (_shares, checkpoint_folders, intact_checkpoint, resume_candidates,
                                     verify_checkpoint, write_manifest)
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
