"""`mm1 data prepare`: validate a corpus and its images, write tar shards and a manifest.

The input is read by one of readers.py's readers (jsonl, webdataset, llava, parquet-caption,
parquet-interleaved); one loop here checks and writes the samples of all of them.

Every bad record is skipped and counted under one reason (the first problem found); no record
can stop the run. Images are fully decoded once here so that training never meets an
undecodable one; the original bytes are stored, so the shards do not depend on the image size.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from megatron_mm1.data.formats import (
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    DataError,
    RecordRejected,
    sha256_file,
    shard_name,
    write_manifest,
)
from megatron_mm1.data.images import MAX_IMAGE_PIXELS, ImageRejected, load_image
from megatron_mm1.data.readers import Sample, open_source

# PIL format name -> file extension used inside the shard.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass
class PrepareResult:
    written: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few "where: reason: detail" for the report

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def summary(self) -> dict:
        return {"written": self.written, "skipped": self.skipped, "skipped_by_reason": dict(self.skipped_by_reason)}


class _ShardWriter:
    """Writes one kind's samples into numbered tar shards, rolling over by count or size."""

    def __init__(self, root: Path, kind: str, samples_per_shard: int, max_shard_bytes: int):
        self.root, self.kind = root, kind
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # fixed metadata: the same input gives byte-identical shards
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, segments: list[dict], images: list[tuple[str, bytes]]) -> None:
        current = self.shards[-1] if self.shards else None
        if self.tar is None or current["samples"] >= self.samples_per_shard or self.tar.fileobj.tell() >= self.max_shard_bytes:
            self.close()
            self.shards.append({"name": shard_name(self.kind, len(self.shards)), "samples": 0, "images": 0})
            self.tar = tarfile.open(self.root / self.shards[-1]["name"], "w", format=tarfile.USTAR_FORMAT)
        for name, data in images:
            self._add(name, data)
        meta = {"kind": self.kind, "segments": segments}
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        self.shards[-1]["samples"] += 1
        self.shards[-1]["images"] += len(images)

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        shard = self.shards[-1]
        shard["bytes"] = (self.root / shard["name"]).stat().st_size
        shard["sha256"] = sha256_file(self.root / shard["name"])


def _checked_images(sample: Sample, max_pixels: int) -> list[bytes]:
    """The sample's image bytes, each fully decoded once; raise RecordRejected for the first bad one."""
    blobs = []
    for j, image in enumerate(sample.images):
        if isinstance(image, Path):
            if not image.is_file():
                raise RecordRejected("missing_image", str(image))
            label, data = str(image), image.read_bytes()
        else:
            label, data = f"image {j}", image
        try:
            load_image(data, max_pixels)
        except ImageRejected as e:
            raise RecordRejected(e.reason, f"{label}: {e}") from None
        blobs.append(data)
    return blobs


def _extension(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return _EXTENSIONS.get(img.format, "img")


def prepare(
    input_path: str | Path | Sequence[str | Path],
    images_dir: str | Path | None,
    out_dir: str | Path,
    samples_per_shard: int = 10_000,
    max_shard_bytes: int = 1 << 30,
    max_pixels: int = MAX_IMAGE_PIXELS,
    progress: bool = True,
    input_format: str = "jsonl",
    text_key: str | None = None,
    image_key: str | None = None,
    conversations_key: str | None = None,
) -> PrepareResult:
    """Convert a corpus (readers.FORMATS) into shards under out_dir; return the counts (also in the manifest).

    images_dir is the folder jsonl and llava image paths are relative to (None for the formats
    that carry their images); the keys are comma-separated field names, None for the defaults.
    """
    source = open_source(input_format, input_path, images_dir, text_key, image_key, conversations_key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("*.tar")) or (out_dir / MANIFEST).exists():
        raise DataError(f"{out_dir} already holds prepared data; choose an empty --out folder")

    writers = {k: _ShardWriter(out_dir, k, samples_per_shard, max_shard_bytes) for k in KINDS}
    result = PrepareResult()
    with tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
        for sample in source.samples():
            bar.update(sample.done - bar.n)
            try:
                if isinstance(sample.record, RecordRejected):
                    raise sample.record
                blobs = _checked_images(sample, max_pixels)
            except RecordRejected as e:
                result.skipped_by_reason[e.reason] += 1
                if len(result.examples) < 10:
                    result.examples.append(f"{sample.where}: {e}")
                continue
            segments, members, j = [], [], 0
            for seg in sample.record.segments:
                if "image" in seg:
                    name = f"{sample.key}.img{j}.{_extension(blobs[j])}"
                    members.append((name, blobs[j]))
                    segments.append({"image": name})
                    j += 1
                else:
                    segments.append(seg)
            writers[sample.record.kind].write(sample.key, segments, members)
            result.written += 1
            bar.set_postfix(written=result.written, skipped=result.skipped, refresh=False)

    kinds = {}
    for kind, w in writers.items():
        w.close()
        if w.shards:
            kinds[kind] = {
                "samples": sum(s["samples"] for s in w.shards),
                "images": sum(s["images"] for s in w.shards),
                "shards": w.shards,
            }
    write_manifest(out_dir, {"version": FORMAT_VERSION, "source": source.describe(), "kinds": kinds,
                             **result.summary()})
    return result
