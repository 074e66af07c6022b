"""The megatron side of conversion: read an MM1 checkpoint one group of tensors at a time.

The model is built on the meta device (no memory) in one process at TP = PP = EP = 1; its
megatron-core sharded state dict names every tensor with its key and global shape in the
checkpoint. `dist_checkpointing.load` of a subset of it reads only that subset's bytes from the
torch_dist shards, whatever layout they were saved at (TP/PP/EP, SwiGLU halves included). Peak
memory is therefore about one layer, not the model.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import torch

from megatron_mm1.checkpoint import load_checkpoint_config, model_sharded_state_dict
from megatron_mm1.config import Config, ConfigError, ParallelConfig
from megatron_mm1.hf.mapping import group_of


def single_process(cfg: Config) -> Config:
    """Start megatron-core in this process at TP = PP = EP = 1 and return that config."""
    from megatron.core import parallel_state

    from megatron_mm1.runtime import init_runtime

    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # an earlier conversion in this process
    init_runtime(cfg)
    return cfg


def check_shards(model_dir: Path) -> None:
    """Refuse a dist checkpoint folder with missing or truncated shard files, before reading."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (model_dir / ".metadata").is_file():
        raise ConfigError(f"{model_dir} is not a dist_checkpointing folder: .metadata is missing")
    try:
        metadata = FileSystemReader(str(model_dir)).read_metadata()
    except Exception as e:
        raise ConfigError(f"{model_dir}/.metadata is unreadable ({e})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = model_dir / name
        if not path.is_file():
            raise ConfigError(f"checkpoint shard {path} is missing")
        if path.stat().st_size < size:
            raise ConfigError(
                f"checkpoint shard {path} is truncated ({path.stat().st_size} of at least {size} bytes)"
            )


class MegatronCheckpoint:
    """An MM1 checkpoint folder (config.yaml + model/), read group by group."""

    def __init__(self, ckpt: str | Path):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        from megatron_mm1.models.mm1 import MM1Model

        self.path = Path(ckpt)
        self.model_dir = self.path / "model"
        self.saved_cfg = load_checkpoint_config(self.path)
        if not self.model_dir.is_dir():
            raise ConfigError(f"{self.path} has no model/ folder (the weights)")
        check_shards(self.model_dir)
        self.cfg = single_process(self.saved_cfg)
        with torch.device("meta"):
            meta = MM1Model(self.cfg)
        sharded = model_sharded_state_dict([meta])["chunk0"]
        # Parameters only: megatron's `_extra_state` entries (ShardedObjects) carry no weights.
        self.entries = {
            name: sh for name, sh in sharded.items()
            if isinstance(sh, (ShardedTensor, ShardedTensorFactory)) and sh.data is not None
        }
        self._check_shapes()

    def _check_shapes(self) -> None:
        """A checkpoint whose tensors do not have this config's shapes is another model."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(str(self.model_dir)).read_metadata().state_dict_metadata
        for name, sh in self.entries.items():
            if not isinstance(sh, ShardedTensor):
                continue  # SwiGLU factories store derived keys; their load checks them
            have = stored.get(f"chunk0.{sh.key}") or stored.get(sh.key)
            if have is None:
                raise ConfigError(
                    f"{self.path}: the weights have no tensor {sh.key}, which its config.yaml "
                    "implies; config.yaml and model/ belong to different models"
                )
            if tuple(getattr(have, "size", ())) != tuple(sh.global_shape):
                raise ConfigError(
                    f"{self.path}: tensor {sh.key} has shape {tuple(have.size)} but config.yaml "
                    f"implies {tuple(sh.global_shape)}; config.yaml and model/ belong to different models"
                )

    def groups(self) -> "OrderedDict[str, list[str]]":
        """Tensor names by conversion group, in model order."""
        out: OrderedDict[str, list[str]] = OrderedDict()
        for name in self.entries:
            out.setdefault(group_of(name), []).append(name)
        return out

    def nbytes(self, names: list[str]) -> int:
        return sum(self.entries[n].data.numel() * self.entries[n].data.element_size() for n in names)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full (unsharded) tensors `names`, reading only their bytes."""
        from megatron.core import dist_checkpointing

        request = {}
        for name in names:
            entry = self.entries[name]
            entry.data = torch.empty(entry.data.shape, dtype=entry.data.dtype)  # replaces meta
            request[name] = entry
        try:
            loaded = dist_checkpointing.load({"chunk0": request}, str(self.model_dir))["chunk0"]
        except Exception as e:  # megatron raises many types for unreadable or foreign data
            raise ConfigError(f"cannot read {names[0]} ... from {self.model_dir}: {e}") from None
        finally:
            for name in names:  # drop our reference; the caller owns the loaded tensors
                entry = self.entries[name]
                entry.data = torch.empty(entry.data.shape, dtype=entry.data.dtype, device="meta")
        return {name: loaded[name] for name in names}
