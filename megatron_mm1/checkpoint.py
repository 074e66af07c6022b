"""Checkpoints on megatron-core's dist_checkpointing.

A checkpoint is a folder:

    CKPT/config.yaml   the resolved config it was trained with
    CKPT/model/        the weights, a dist_checkpointing folder: loadable at any TP/PP/EP layout

Model weights are saved apart from everything else so that conversion and layout changes read
only them.
"""

from __future__ import annotations

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


def save_model(model: list[torch.nn.Module], path: Path, state: dict | None = None) -> None:
    """Save this rank's shards of the weights (or of `state`, a sharded state dict with the
    same layout) into the dist_checkpointing folder `path`. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=False)
    torch.distributed.barrier()
    dist_checkpointing.save(state if state is not None else model_sharded_state_dict(model), str(path))


def load_model(model: list[torch.nn.Module], path: Path) -> None:
    """Load weights saved at any layout into this rank's chunks. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    if not Path(path).is_dir():
        raise ConfigError(f"no model weights at {path}")
    loaded = dist_checkpointing.load(model_sharded_state_dict(model), str(path))
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[f"chunk{i}"])
