"""The Hugging Face side of conversion: sharded safetensors written and read tensor by tensor."""

from __future__ import annotations

import ctypes
import json
import math
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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


# safetensors dtype names.
DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


class ShardWriter:
    """Writes safetensors shards tensor by tensor, holding none of them in memory.

    `plan` lists every tensor (name, shape, dtype) in the order `add` will receive them, so
    shard boundaries and each shard's header are known before its data: a shard's header is
    written when the shard opens and each tensor's bytes are appended as it arrives. A shard
    closes when the next tensor would push it past `max_bytes` (a larger tensor gets a shard of
    its own). `finish` writes the index transformers reads.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple, torch.dtype]], max_bytes: int):
        self.folder = folder
        self.shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        self.total_bytes = sum(t[3] for shard in self.shards for t in shard)
        self.files = [
            f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))
        ]
        self.expected = ((i, t) for i, shard in enumerate(self.shards) for t in shard)
        self.current: int | None = None
        self.handle = None

    def _open(self, i: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[i]:
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.handle = open(self.folder / self.files[i], "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.current = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        i, (want, shape, dtype, _) = next(self.expected)
        if (want, shape, dtype) != (name, tuple(tensor.shape), tensor.dtype):
            raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} arrived out of plan (expected {want})")
        if i != self.current:
            self._open(i)
        self.handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def finish(self) -> list[str]:
        """Close the last shard and write the index; returns the shard file names."""
        if next(self.expected, None) is not None:
            raise RuntimeError("conversion ended before every planned tensor was written")
        if self.handle is not None:
            self.handle.close()
        weight_map = {t[0]: self.files[i] for i, shard in enumerate(self.shards) for t in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files


class HFFolder:
    """A Hugging Face model folder: config.json and safetensors weights (one file or sharded
    with an index). Every shard is checked on opening; tensors are read on demand.

    Tensors are read with plain file reads into their own memory rather than through
    safetensors' memory map, whose touched pages stay resident for as long as the file is
    open: reading a whole folder through it costs memory up to the folder's size."""

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
        self.where: dict[str, tuple[Path, int, dict]] = {}  # name -> file, data start, header entry
        for file in files:
            path = self.path / file
            if not path.is_file():
                raise ConfigError(f"{what} {self.path}: shard {file} listed in {INDEX} is missing")
            self.where.update({name: (path, *entry) for name, entry in self._header(path).items()})
        if weight_map:
            absent = sorted(n for n, f in weight_map.items() if n not in self.where or self.where[n][0].name != f)
            if absent:
                raise ConfigError(f"{what} {self.path}: {len(absent)} tensors of {INDEX} are not in their shard, e.g. {absent[0]}")

    @staticmethod
    def _header(path: Path) -> dict[str, tuple[int, dict]]:
        """name -> (where the data starts, header entry), after safetensors has validated the
        header against the file size (a truncated file fails here)."""
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path} is not a complete safetensors file ({e})") from None
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        return {name: (8 + length, entry) for name, entry in header.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"{self.path}: no tensor {name}")
        path, start, entry = self.where[name]
        if entry["dtype"] not in TORCH_DTYPES:
            raise ConfigError(f"{path}: {name} has dtype {entry['dtype']}, which conversion does not read")
        out = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if end == begin:
            return out
        # Read straight into the tensor's memory (not through numpy, which would pin its
        # storage: the checkpoint writer frees each parameter's storage once written).
        buffer = (ctypes.c_char * (end - begin)).from_address(out.data_ptr())
        with open(path, "rb") as f:
            f.seek(start + begin)
            n = f.readinto(buffer)
        if n != end - begin:
            raise ConfigError(f"{path}: cannot read {name} ({n} of {end - begin} bytes)")
        return out
