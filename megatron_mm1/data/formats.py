"""On-disk formats: input JSONL records, prepared tar shards, and the manifest.

Input JSONL, one record per line (image paths relative to an images folder):
    {"type": "caption", "image": PATH, "text": STR}
    {"type": "interleaved", "segments": [{"text": STR} | {"image": PATH}, ...]}
    {"type": "text", "text": STR}
    {"type": "chat", "messages": [{"role": "system"|"user"|"assistant",
                                   "content": STR | [{"text": STR} | {"image": PATH}, ...]}, ...]}

Other input formats (webdataset shards, LLaVA conversations, parquet) are read by readers.py
into the same Records.

Prepared folder (webdataset layout, plain tar):
    manifest.json                      counts, shard sizes and sha256 checksums, in training order
    {kind}-u{unit:06d}-{n:04d}.tar     the n-th shard of one kind from input unit `unit` (readers.Unit);
                                       folders prepared before units were named {kind}-{n:06d}.tar: the
                                       loader reads whatever names the manifest lists
        {key}.json                     {"kind": ..., "segments": [{"text": s} | {"image": member}]}
        {key}.img{j}.{ext}             the j-th image's original bytes (validated at preparation)
Every kind is normalised to a segment list: a caption is [image, text], a text document [text].
A chat becomes "System: ...", "User: ...", "Assistant: ..." turns; its text segments carry
"loss": true on the assistants' answers only (supervised fine-tuning), false elsewhere.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_mm1.config import ConfigError

KINDS = ("interleaved", "caption", "text", "chat")
CHAT_ROLES = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DataError(ConfigError):
    """Data or tokenizer the pipeline cannot use; the message says what to fix."""


class RecordRejected(Exception):
    """A bad input record; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Record:
    kind: str
    segments: list[dict]  # each {"text": str} (chat: plus "loss": bool) or {"image": path}

    @property
    def image_paths(self) -> list[str]:
        return [s["image"] for s in self.segments if "image" in s]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RecordRejected("invalid_record", f"'{field}' must be a string")
    return value


def _image(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise RecordRejected("invalid_record", "'image' must be a non-empty path")
    return value


def _chat_segments(messages: Any) -> list[dict]:
    """Turns as text and image segments; only the assistants' answers carry the loss."""
    if not isinstance(messages, list) or not messages:
        raise RecordRejected("invalid_record", "'messages' must be a non-empty list")
    segments: list[dict] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise RecordRejected("invalid_record", f"message role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        parts = [{"text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RecordRejected("invalid_record", "'content' must be a string or a list of segments")
        answer = role == "assistant"
        segments.append({"text": ("\n" if segments else "") + CHAT_ROLES[role], "loss": False})
        for part in parts:
            if isinstance(part, dict) and set(part) == {"text"}:
                segments.append({"text": _text(part["text"], "text"), "loss": answer})
            elif isinstance(part, dict) and set(part) == {"image"}:
                segments.append({"image": _image(part["image"])})
            else:
                raise RecordRejected("invalid_record", f"content part {part!r} is neither {{'text'}} nor {{'image'}}")
    if not any(seg.get("loss") and seg["text"].strip() for seg in segments):
        raise RecordRejected("empty_text", "no assistant answer to learn from")
    return segments


def parse_record(line: str) -> Record:
    """Parse and validate one JSONL line; raise RecordRejected (malformed_json, invalid_record, empty_text)."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise RecordRejected("malformed_json", str(e)) from None
    return record_from_object(obj)


def record_from_object(obj: Any) -> Record:
    """Validate one parsed record (a JSONL line's object); raise RecordRejected (invalid_record, empty_text)."""
    if not isinstance(obj, dict):
        raise RecordRejected("invalid_record", "a record must be a JSON object")
    kind = obj.get("type")
    if kind == "caption":
        text = _text(obj.get("text"), "text")
        segments = [{"image": _image(obj.get("image"))}, {"text": text}]
    elif kind == "text":
        segments = [{"text": _text(obj.get("text"), "text")}]
    elif kind == "interleaved":
        raw = obj.get("segments")
        if not isinstance(raw, list):
            raise RecordRejected("invalid_record", "'segments' must be a list")
        segments = []
        for seg in raw:
            if isinstance(seg, dict) and set(seg) == {"text"}:
                if _text(seg["text"], "text").strip():  # empty text segments carry nothing
                    segments.append({"text": seg["text"]})
            elif isinstance(seg, dict) and set(seg) == {"image"}:
                segments.append({"image": _image(seg["image"])})
            else:
                raise RecordRejected("invalid_record", f"segment {seg!r} is neither {{'text'}} nor {{'image'}}")
    elif kind == "chat":
        segments = _chat_segments(obj.get("messages"))
    else:
        raise RecordRejected("invalid_record", f"unknown type {kind!r}; use caption, interleaved, text or chat")
    # The loss is on text only: a sample without text teaches nothing.
    if not any(s.get("text", "").strip() for s in segments):
        raise RecordRejected("empty_text", "no text")
    return Record(kind, segments)


_SHARD_NAME = re.compile(rf"({'|'.join(KINDS)})-u(\d+)-\d+\.tar")


def shard_name(kind: str, unit: int, index: int) -> str:
    return f"{kind}-u{unit:06d}-{index:04d}.tar"


def shard_unit(file_name: str) -> int | None:
    """The unit a shard file (or a temporary file named after one) belongs to; None for other files."""
    match = _SHARD_NAME.match(file_name)
    return int(match[2]) if match else None


# ----------------------------------------------------------------------------- manifest


def write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)  # atomic: a crashed run never leaves a half manifest


def load_manifest(root: str | Path) -> dict:
    """Read a prepared folder's manifest and check every shard is present with its recorded size.

    The size check is cheap and catches truncated copies; `verify_checksums` does the full check.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a prepared data folder (no {MANIFEST}); run `mm1 data prepare`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `mm1 data prepare`") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.get('version')}, expected {FORMAT_VERSION}")
    for kind, info in manifest["kinds"].items():
        for shard in info["shards"]:
            file = root / shard["name"]
            if not file.is_file():
                raise DataError(f"shard {file} is missing; re-run `mm1 data prepare` or restore it")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise DataError(f"shard {file} is {size} bytes but the manifest records {shard['bytes']}: "
                                "it is truncated or modified; re-run `mm1 data prepare` or restore it")
    return manifest


def sha256_file(path: str | Path, on_block: Callable[[int], object] = lambda n: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            on_block(len(block))
    return digest.hexdigest()


def verify_checksums(root: str | Path, progress: bool = False) -> list[str]:
    """Names of the shards whose sha256 differs from the manifest (empty when all are intact)."""
    from tqdm import tqdm

    root = Path(root)
    shards = [shard for info in load_manifest(root)["kinds"].values() for shard in info["shards"]]
    total = sum(shard["bytes"] for shard in shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=not progress) as bar:
        return [shard["name"] for shard in shards if sha256_file(root / shard["name"], bar.update) != shard["sha256"]]


# ----------------------------------------------------------------------------- random access


class _OpenShards:
    """Per-process cache of open tar files and their member tables.

    Keyed by pid: loader workers are forked, and a file object shared with the parent would share
    its seek position, so each process opens its own.
    """

    MAX_OPEN = 64

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.open: OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo], list[str]]] = OrderedDict()

    def get(self, path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo], list[str]]:
        if self.pid != os.getpid():
            self.__init__()
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        try:
            tar = tarfile.open(path, "r:")
            members = {m.name: m for m in tar.getmembers()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot read shard {path} ({e}); re-run `mm1 data prepare`") from None
        keys = [name[: -len(".json")] for name in members if name.endswith(".json")]
        self.open[path] = (tar, members, keys)
        if len(self.open) > self.MAX_OPEN:
            self.open.popitem(last=False)[1][0].close()
        return self.open[path]

    def read(self, path: str, name: str) -> bytes:
        tar, members, _ = self.get(path)
        if name not in members:
            raise DataError(f"shard {path} has no member {name}; re-run `mm1 data prepare`")
        f = tar.extractfile(members[name])
        data = f.read() if f else b""
        if len(data) != members[name].size:
            raise DataError(f"shard {path} is truncated at {name}; re-run `mm1 data prepare`")
        return data


_SHARDS = _OpenShards()


def read_member(shard: str, name: str) -> bytes:
    return _SHARDS.read(shard, name)


class ShardedDataset:
    """Random access to the samples of one kind in one prepared folder."""

    def __init__(self, root: str | Path, kind: str, manifest: dict | None = None):
        self.root = Path(root)
        self.kind = kind
        manifest = manifest or load_manifest(self.root)
        shards = manifest["kinds"].get(kind, {"shards": []})["shards"]
        self.shards = [str(self.root / s["name"]) for s in shards]
        self.starts = [0]
        for s in shards:
            self.starts.append(self.starts[-1] + s["samples"])

    @property
    def name(self) -> str:
        return f"{self.root}:{self.kind}"

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:
        """The sample as {"kind", "segments"}, image segments as {"image": (shard, member)}."""
        s = bisect.bisect_right(self.starts, index) - 1
        shard = self.shards[s]
        _, _, keys = _SHARDS.get(shard)
        local = index - self.starts[s]
        if local >= len(keys):
            raise DataError(f"shard {shard} holds {len(keys)} samples, fewer than the manifest says; "
                            "re-run `mm1 data prepare`")
        sample = json.loads(read_member(shard, keys[local] + ".json"))
        for seg in sample["segments"]:
            if "image" in seg:
                seg["image"] = (shard, seg["image"])
        return sample
