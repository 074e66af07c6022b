"""The megatron side of conversion: MM1 checkpoints read and written one tensor group at a time.

The model is built on the meta device (no memory) in one process at TP = PP = EP = 1; its
megatron-core sharded state dict says, for every parameter, which checkpoint key and which
region of that key's global tensor it is (layers of a homogeneous block, and experts, are
stacked along leading axes under one key; SwiGLU's fc1 is stored as [gate; up] halves).

dist_checkpointing's torch_dist format is torch.distributed.checkpoint's: `.metadata` lists
every key's chunks (offsets and sizes in the global tensor) and where each chunk's bytes lie
(file, offset, length, a torch.save blob). `MegatronCheckpoint.read` loads only the chunks
that overlap the requested regions, whatever layout (TP/PP/EP) wrote them, so peak memory is
about one tensor group (one decoder layer), not the model; megatron's own
`dist_checkpointing.load` reads a stacked key only whole (all layers at once). `write_model`
writes the chunks one parameter at a time through torch.distributed.checkpoint's writer, as
megatron would save that one-process model, so training loads the result at any layout.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from tqdm import tqdm

from megatron_mm1.checkpoint import intact_checkpoint, load_checkpoint_config, model_sharded_state_dict
from megatron_mm1.config import Config, ConfigError
from megatron_mm1.hf.mapping import group_of
from megatron_mm1.runtime import single_process


def check_shards(model_dir: Path):
    """The folder's torch.distributed.checkpoint Metadata; refuses a dist checkpoint folder with
    missing or truncated shard files, before anything is read."""
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
    return metadata


def reference_spec(cfg: Config) -> Config:
    """`cfg` at the `local` layer spec, whose module names conversion maps. Every spec saves the
    same checkpoint, but `fast` holds a MoE layer's experts in two stacked parameters
    (models/experts.py) rather than SequentialMLP's per-expert linears."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layer_spec="local"))


def sharded_layout(cfg: Config) -> dict:
    """The parameters (name -> ShardedTensor, or a factory that stores several) of a
    one-process MM1Model of `cfg` (after `single_process`), built on the meta device."""
    from megatron_mm1.models.mm1 import MM1Model

    with torch.device("meta"):
        meta = MM1Model(reference_spec(cfg))
    sharded = model_sharded_state_dict([meta])["chunk0"]
    return {
        name: sh for name, sh in sharded.items()
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory)) and sh.data is not None
    }


def stored_pieces(entry, data: torch.Tensor | None = None) -> list[ShardedTensor]:
    """The ShardedTensors stored for one parameter (a factory stores several), holding `data`
    (the full parameter) instead of the entry's own when given."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    if data is not None:
        entry = dataclasses.replace(entry, data=data)
    if isinstance(entry, ShardedTensor):
        return [entry]
    built = entry.build()
    return list(nested_values(built)) if isinstance(built, (dict, list)) else [built]


def chunk_size(piece: ShardedTensor) -> tuple[int, ...]:
    """The piece's extent in its key's global tensor (stacking axes included)."""
    return (1,) * piece.prepend_axis_num + tuple(piece.local_shape)


class MegatronCheckpoint:
    """An MM1 checkpoint folder (config.yaml + model/), read group by group."""

    def __init__(self, ckpt: str | Path, progress: bool = False):
        # A checkpoint, or a run's newest intact one; its weights checked against the manifest
        # that training and `mm1 convert from-hf` write (a folder put together by hand has only
        # the structural checks below).
        self.path = intact_checkpoint(Path(ckpt), only="model/", progress=progress)
        self.model_dir = self.path / "model"
        self.saved_cfg = load_checkpoint_config(self.path)
        if not self.model_dir.is_dir():
            raise ConfigError(f"{self.path} has no model/ folder (the weights)")
        metadata = check_shards(self.model_dir)
        self.cfg = single_process(reference_spec(self.saved_cfg))
        self.entries = sharded_layout(self.cfg)
        self.stored = metadata.state_dict_metadata  # key -> global size and chunks
        self.storage = {  # (key, chunk offsets) -> file, offset, length
            (index.fqn, tuple(index.offset)): info
            for index, info in metadata.storage_data.items() if index.offset is not None
        }
        self._check_shapes()

    def _check_shapes(self) -> None:
        """A checkpoint whose tensors do not have this config's shapes is another model."""
        for name in self.entries:
            for sh in stored_pieces(self.entries[name]):
                have = self.stored.get(sh.key)
                if have is None:
                    raise ConfigError(
                        f"{self.path}: the weights have no tensor {sh.key}, which its config.yaml "
                        "implies; config.yaml and model/ belong to different models"
                    )
                if tuple(have.size) != tuple(sh.global_shape):
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
        """The full (unsharded) tensors `names`, reading only the chunks that hold them."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

        out = {}
        for name in names:
            entry = self.entries[name]
            if isinstance(entry, ShardedTensor):
                out[name] = self._read_region(entry)
            else:  # a factory: read what it stores, then let it merge (SwiGLU: cat of halves)
                built = dict_list_map_inplace(self._read_region, entry.build())
                out[name] = entry.merge_fn(built)
        return out

    def _read_region(self, sh) -> torch.Tensor:
        """ShardedTensor `sh`'s region of its key's global tensor, assembled from chunks."""
        sizes = chunk_size(sh)
        lo = tuple(sh.global_offset)
        for chunk in self.stored[sh.key].chunks:
            if (tuple(chunk.offsets), tuple(chunk.sizes)) == (lo, sizes):  # saved as one chunk:
                return self._load_chunk(sh.key, lo).reshape(sh.local_shape)  # no assembly copy
        out = torch.empty(sizes, dtype=sh.dtype)
        filled = 0
        for chunk in self.stored[sh.key].chunks:
            c_lo, c_size = tuple(chunk.offsets), tuple(chunk.sizes)
            a = [max(x, y) for x, y in zip(lo, c_lo)]
            b = [min(x + n, y + m) for x, n, y, m in zip(lo, sizes, c_lo, c_size)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            data = self._load_chunk(sh.key, c_lo)
            out[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))] = data[
                tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c_lo))
            ]
            filled += math.prod(y - x for x, y in zip(a, b))
        if filled != out.numel():
            raise ConfigError(f"{self.model_dir}: the chunks of {sh.key} do not cover the region of {sh}")
        return out.reshape(sh.local_shape)

    def _load_chunk(self, key: str, offsets: tuple) -> torch.Tensor:
        info = self.storage[(key, offsets)]
        if info.transform_descriptors:
            raise ConfigError(f"{self.model_dir}: {key} is stored with transforms {info.transform_descriptors}, which this reader does not support")
        with open(self.model_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        except Exception as e:
            raise ConfigError(f"{self.model_dir}/{info.relative_path}: chunk of {key} is unreadable ({e})") from None


class _PlannedSave(DefaultSavePlanner):
    """torch.distributed.checkpoint's planner with the items given rather than found in a
    state dict, and their data produced on request, in plan order."""

    def __init__(self, items: list[WriteItem], resolve: Callable[[WriteItem], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items, self.resolve = items, resolve

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.resolve(write_item)


def write_model(
    model_dir: Path,
    entries: dict,
    tensor_for: Callable[[str, torch.Tensor], torch.Tensor],
    progress: bool = True,
) -> None:
    """Write the dist_checkpointing folder of the one-process model whose `sharded_layout` is
    `entries` and whose parameter `name` is `tensor_for(name, like)`, `like` a meta tensor of its
    shape and dtype. Parameters are asked for one at a time, in model order, and their memory
    is freed once written (`tensor_for` must return a tensor nothing else uses); the folder is
    what megatron saves for that model, so it loads at any layout."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
    from torch.distributed.checkpoint import FileSystemWriter, save

    items: list[WriteItem] = []
    owner: dict[MetadataIndex, tuple[str, int]] = {}  # chunk -> (parameter, piece number)
    for name, entry in entries.items():
        for k, piece in enumerate(stored_pieces(entry)):
            index = MetadataIndex(piece.key, torch.Size(piece.global_offset))
            chunk = ChunkStorageMetadata(offsets=index.offset, sizes=torch.Size(chunk_size(piece)))
            data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=piece.dtype),
                                   size=torch.Size(piece.global_shape))
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data))
            owner[index] = (name, k)

    bar = tqdm(total=sum(e.data.numel() * e.data.element_size() for e in entries.values()),
               unit="B", unit_scale=True, desc="checkpoint", disable=not progress)
    current: dict[str, list[ShardedTensor]] = {}  # the one parameter in memory, as its pieces

    def resolve(item: WriteItem) -> torch.Tensor:
        name, k = owner[item.index]
        if name not in current:
            for pieces in current.values():
                # torch's writer keeps the last chunk of every key it wrote until the file is
                # closed (for its safetensors format), which would hold the largest parameters
                # to the end: free the memory itself, before reading the next parameter.
                storage = pieces[0].data.untyped_storage()
                if storage.resizable():
                    storage.resize_(0)
            current.clear()
            entry = entries[name]
            tensor = tensor_for(name, entry.data)
            if tensor.shape != entry.data.shape or tensor.dtype != entry.data.dtype:
                raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"need {tuple(entry.data.shape)} {entry.data.dtype}")
            current[name] = stored_pieces(entry, tensor)
            bar.update(tensor.numel() * tensor.element_size())
        piece = current[name][k]
        return piece.data.reshape(chunk_size(piece))

    model_dir.mkdir(parents=True)
    # One thread and one file: the writer asks for chunks in plan order, one at a time.
    writer = FileSystemWriter(str(model_dir), single_file_per_rank=True, thread_count=1)
    save({}, storage_writer=writer, planner=_PlannedSave(items, resolve), no_dist=True)
    bar.close()
    torch.save({}, model_dir / COMMON_STATE_FNAME)  # no state outside the sharded tensors
    save_config(CheckpointingConfig("torch_dist", 1), str(model_dir))
