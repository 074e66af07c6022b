"""The Hugging Face side of conversion: sharded safetensors written and read tensor by tensor."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_mm1.config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def parse_size(text: str) -> int:
    """'2GB', '500MB', '10KB' or a byte count -> bytes (decimal units, as transformers uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: use e.g. 2GB, 500MB or a byte count")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * scale)


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the next tensor would push the
    shard past `max_bytes` (a tensor larger than that gets a shard of its own). `finish` names
    the shards model-0000i-of-0000N.safetensors and writes the index transformers reads."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names of each written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        # Own contiguous storage: safetensors refuses views that share memory (q/k/v splits).
        self.pending[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.folder / self._part(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    @staticmethod
    def _part(i: int) -> str:
        return f"part-{i:05d}.safetensors"

    def finish(self) -> list[str]:
        """Write the last shard, name all shards and write the index; returns the file names."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(self.folder / self._part(i), self.folder / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


class HFFolder:
    """A Hugging Face model folder: config.json and safetensors weights (one file or sharded
    with an index). Every shard's header is checked on opening; tensors are read on demand."""

    def __init__(self, folder: str | Path, what: str = "--hf"):
        self.path = Path(folder)
        config = self.path / "config.json"
        if not config.is_file():
            raise ConfigError(f"{what} {self.path}: no config.json (not a Hugging Face model folder)")
        try:
            self.config = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config} is not valid JSON ({e})") from None
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise ConfigError(f"{what} {self.path}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self.handles = {}
        self.where: dict[str, str] = {}
        for file in files:
            path = self.path / file
            if not path.is_file():
                raise ConfigError(f"{what} {self.path}: shard {file} listed in {INDEX} is missing")
            self.handles[file] = self._open(path)
            self.where.update({name: file for name in self.handles[file].keys()})
        if weight_map:
            absent = sorted(n for n, f in weight_map.items() if self.where.get(n) != f)
            if absent:
                raise ConfigError(f"{what} {self.path}: {len(absent)} tensors of {INDEX} are not in their shard, e.g. {absent[0]}")

    @staticmethod
    def _open(path: Path):
        # safe_open validates the header against the file size, so a truncated file fails here.
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path} is not a complete safetensors file ({e})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"{self.path}: no tensor {name}")
        try:
            return self.handles[self.where[name]].get_tensor(name)
        except SafetensorError as e:
            raise ConfigError(f"{self.path}/{self.where[name]}: cannot read {name} ({e})") from None
