"""Checkpoints on megatron-core's dist_checkpointing.

A checkpoint is a folder:

    CKPT/config.yaml   the resolved config it was trained with
    CKPT/model/        the weights, a dist_checkpointing folder: loadable at any TP/PP/EP layout

Model weights are saved apart from everything else so that conversion and layout changes read
only them.
"""

from __future__ import annotations

import queue
from pathlib import Path

import torch
import yaml

from megatron_mm1.config import Config, ConfigError, _build, config_to_dict


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_checkpoint_config(ckpt: str | Path) -> Config:
    """The config a checkpoint was saved with."""
    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{ckpt} is not an MM1 checkpoint: {path.name} is missing")
    return _build(Config, yaml.safe_load(path.read_text()))


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)  # DDP / DeepSpeed wrappers


def model_sharded_state_dict(model: list[torch.nn.Module]) -> dict:
    """megatron-core sharded state dict of this rank's model chunks."""
    return {f"chunk{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def save_sharded(state: dict, path: Path) -> None:
    """Save this rank's part of a megatron-core sharded state dict into the new
    dist_checkpointing folder `path`. Collective over all ranks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=False)
    torch.distributed.barrier()
    # megatron's writer hands each save's results back through a queue that it makes, once per
    # process, in a spawn-started multiprocessing Manager; that server imports torch to unpickle
    # them, seconds per rank on the first save. A synchronous save puts and takes them in this
    # process, so a plain queue serves.
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(state, str(path))


def save_model(model: list[torch.nn.Module], path: Path) -> None:
    """Save this rank's shards of the weights into the dist_checkpointing folder `path`."""
    save_sharded(model_sharded_state_dict(model), path)


def load_model(model: list[torch.nn.Module], path: Path) -> None:
    """Load weights saved at any layout into this rank's chunks. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    if not Path(path).is_dir():
        raise ConfigError(f"no model weights at {path}")
    loaded = dist_checkpointing.load(model_sharded_state_dict(model), str(path))
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[f"chunk{i}"])


# ----------------------------------------------------------------------------- training runs
#
#   RUN/checkpoints/step_0000100/   config.yaml, model/, optimizer/ (megatron engine) or
#                                   deepspeed/ (deepspeed engine), train_state.json,
#                                   data/dp<k>.json (loader state of data-parallel rank k),
#                                   rng/rank<r>.pt
#   RUN/checkpoints/latest          the newest complete checkpoint's folder name, moved last
#
# A checkpoint is written under a hidden temporary name and renamed when complete, so a folder
# named step_* is always complete; a kill during a save leaves only a temporary folder, which
# --resume never reads and the next run removes.

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under RUN/checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir():
            return named
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_incomplete(root: Path) -> None:
    """Remove what interrupted saves left behind (rank 0 only)."""
    import shutil

    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def begin_save(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into. Collective."""
    import shutil

    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        (tmp / "rng").mkdir()
    torch.distributed.barrier()
    return tmp


def finish_save(root: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Publish a fully written checkpoint: rename it, then move `latest`, then prune. Collective."""
    import os
    import shutil

    final = root / step_dir_name(step)
    torch.distributed.barrier()  # every rank has written its part
    if torch.distributed.get_rank() == 0:
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def _fsync_tree(path: Path) -> None:
    """Flush file contents to disk before the rename makes them visible."""
    import os

    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
