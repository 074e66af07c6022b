"""Input readers for `mm1 data prepare --format ...`: each turns one kind of corpus into Samples.

The input is first cut into units (`Source.plan`), fixed pieces that depend only on the input and
the unit size: a webdataset file, `unit_samples` lines of a JSONL file, rows of a parquet file or
records of a LLaVA JSON list. A unit is the grain of parallel work and of resumption; `prepare`
writes each one into its own shards, so the output does not depend on how many processes read it.

A reader yields one Sample per input record of a unit, in a deterministic order: where the record
is (for the report), the key it gets in the shards, the parsed Record or the reason it was
rejected, and its images, one per image segment of the Record: bytes taken from the input itself
(tar shards, parquet), or paths under --images still to be read (jsonl, llava). `prepare` checks
the images and writes the shards; a bad record is a rejected Sample, never an exception. Only a
wrong invocation (missing input, a column that is not there) or a llava JSON list that does not
parse raises DataError, while planning, before any shard is written.

    jsonl                 the native records of formats.py, one per line
    webdataset            img2dataset tar shards: KEY.jpg + KEY.txt (+ KEY.json) -> caption
                          (extensions are matched in lower case)
    llava                 LLaVA / ShareGPT4V conversations (JSON list or JSONL) -> chat
    parquet-caption       an image-bytes column and a text column -> caption
    parquet-interleaved   OBELICS: parallel `texts` / `images` lists -> interleaved

A sample's key names its input record whatever the unit size and the number of processes: the
line number (JSONL files), the record number (a JSON list, from 1), or the file's number in the
input list (6 digits) followed by the record's position in that file (9 digits: the sample's
index in a webdataset file, the row of a parquet file, rejected records included).
"""

from __future__ import annotations

import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from megatron_mm1.data.formats import DataError, Record, RecordRejected, parse_record, record_from_object

FORMATS = ("jsonl", "webdataset", "llava", "parquet-caption", "parquet-interleaved")
# The formats whose records name image files relative to --images; the others carry image bytes.
IMAGES_DIR_FORMATS = ("jsonl", "llava")
# The formats whose --input may be several files or folders of them (glob, read in name order).
FOLDER_GLOBS = {"webdataset": "*.tar", "parquet-caption": "*.parquet", "parquet-interleaved": "*.parquet"}
# The field names each format reads, each a list of alternatives: the first present is used.
DEFAULT_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "jsonl": {},
    "webdataset": {"text_key": ("txt",), "image_key": ("jpg", "jpeg", "png", "webp")},
    "llava": {"image_key": ("image",), "conversations_key": ("conversations",)},
    "parquet-caption": {"text_key": ("caption", "text"), "image_key": ("image",)},
    "parquet-interleaved": {"text_key": ("texts",), "image_key": ("images",)},
}

IMAGE_MARKER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PARQUET_BATCH_ROWS = 64  # rows decoded at a time: a batch of images, not a whole file, is in memory
UNIT_SAMPLES = 10_000  # lines, rows or records per unit by default (a webdataset unit is one file)
LINE_SCAN_BYTES = 1 << 24  # JSONL files are scanned for line starts this many bytes at a time
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class Sample:
    where: str  # "line 12", "00003.tar key 000031337", "train-00000.parquet row 7"
    key: str  # the sample's key in the prepared shards
    record: Record | RecordRejected
    images: list[bytes | Path] = field(default_factory=list)  # one per image segment of record


@dataclass
class Unit:
    """A fixed piece of one input file: the grain of parallel work, of resumption and of shards.

    `start` and `stop` (exclusive; None: the file's end) count bytes for the JSONL formats (on
    line starts), rows for parquet, records for a LLaVA JSON list; a webdataset unit is a file.
    """

    index: int  # position in the plan: the final shard list follows it
    file: int  # index into Source.files
    where: str  # "in.jsonl lines 1-10000", "00003.tar", "train.parquet rows 0-9999", for messages
    bytes: int  # the input bytes it covers, for the progress bar
    start: int = 0
    stop: int | None = None
    first_line: int = 1  # JSONL formats: the number of the line at byte `start`
    records: list | None = None  # LLaVA JSON list: the unit's records (parsed once, when planning)


@dataclass
class Source:
    """What `prepare` reads: the format, its files in reading order, the images folder, the keys."""

    input_format: str
    inputs: list[str]  # as given on the command line
    files: list[Path]
    images_dir: Path | None
    keys: dict[str, tuple[str, ...]]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def describe(self) -> dict:
        """The manifest's "source" entry."""
        return {"format": self.input_format, "inputs": self.inputs,
                "images": None if self.images_dir is None else str(self.images_dir),
                **{name: list(alternatives) for name, alternatives in self.keys.items()}}

    def plan(self, unit_samples: int = UNIT_SAMPLES) -> list[Unit]:
        """The input cut into units, in reading order: a function of the input and unit_samples only."""
        return _PLANNERS[self.input_format](self, unit_samples)

    def samples(self, unit: Unit) -> Iterator[Sample]:
        """One unit's samples, in reading order."""
        return _READERS[self.input_format](self, unit)


def open_source(
    input_format: str,
    inputs: str | Path | list[str | Path],
    images_dir: str | Path | None = None,
    text_key: str | None = None,
    image_key: str | None = None,
    conversations_key: str | None = None,
) -> Source:
    """Check the invocation (files, folders, keys) and resolve the files to read; raise DataError.

    Keys are comma-separated alternatives ("jpg,png"); None takes the format's default.
    """
    if input_format not in FORMATS:
        raise DataError(f"unknown --format {input_format!r}; use one of {', '.join(FORMATS)}")
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not inputs:
        raise DataError("no --input given")
    given = {"text_key": text_key, "image_key": image_key, "conversations_key": conversations_key}
    keys = dict(DEFAULT_KEYS[input_format])
    for name, value in given.items():
        if value is None:
            continue
        if name not in keys:
            raise DataError(f"--{name.replace('_', '-')} does not apply to --format {input_format}")
        if input_format == "webdataset":
            value = value.lower()  # member extensions are compared in lower case
        keys[name] = tuple(k.strip() for k in value.split(",") if k.strip())
        if not keys[name]:
            raise DataError(f"--{name.replace('_', '-')} is empty")

    if input_format in IMAGES_DIR_FORMATS:
        if images_dir is None:
            raise DataError(f"--format {input_format} needs --images: the folder its image paths are relative to")
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise DataError(f"images folder {images_dir} does not exist")
    elif images_dir is not None:
        raise DataError(f"--images does not apply to --format {input_format}: its images are inside the input")

    files = _input_files(input_format, [Path(p) for p in inputs])
    source = Source(input_format, [str(p) for p in inputs], files, images_dir, keys)
    if input_format.startswith("parquet"):
        _check_parquet_columns(source)
    return source


def _input_files(input_format: str, inputs: list[Path]) -> list[Path]:
    glob = FOLDER_GLOBS.get(input_format)
    if glob is None and len(inputs) > 1:
        raise DataError(f"--format {input_format} reads one --input file, not {len(inputs)}")
    files = []
    for path in inputs:
        if path.is_file():
            files.append(path)
        elif path.is_dir() and glob:
            found = sorted(p for p in path.glob(glob) if p.is_file())
            if not found:
                raise DataError(f"input folder {path} holds no {glob} files")
            files.extend(found)
        elif path.is_dir():
            raise DataError(f"input {path} is a folder; --format {input_format} reads one file")
        else:
            raise DataError(f"input file {path} does not exist")
    return files


def _first_present(container: Any, alternatives: tuple[str, ...]) -> str | None:
    return next((k for k in alternatives if k in container), None)


# ----------------------------------------------------------------------------- jsonl


def _plan_lines(source: Source, unit_samples: int) -> list[Unit]:
    """Units of `unit_samples` lines (blank ones included) of the one input file: one pass finds
    the byte offset of every unit_samples-th line start, counting newlines a block at a time."""
    path = source.files[0]
    starts, newlines, size, last_byte = [0], 0, 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(LINE_SCAN_BYTES), b""):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
            # The newline numbered k (from 1) ends line k; a unit starts after each multiple of unit_samples.
            first = unit_samples - 1 - newlines % unit_samples
            starts.extend((size + ends[first::unit_samples] + 1).tolist())
            newlines, size, last_byte = newlines + len(ends), size + len(block), block[-1:]
    if size == 0:
        return []
    if starts[-1] == size:  # the file ends right after a unit's last line
        starts.pop()
    lines = newlines + (last_byte != b"\n")
    units = []
    for index, start in enumerate(starts):
        stop = starts[index + 1] if index + 1 < len(starts) else size
        first_line = index * unit_samples + 1
        last_line = min(first_line + unit_samples - 1, lines)
        units.append(Unit(index, 0, f"{path.name} lines {first_line}-{last_line}", stop - start, start, stop,
                          first_line))
    return units


def _unit_lines(source: Source, unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for each line of a JSONL unit."""
    with open(source.files[unit.file], "rb") as f:
        f.seek(unit.start)
        position = unit.start
        for line_no, raw in enumerate(f, start=unit.first_line):
            if position >= unit.stop:
                return
            position += len(raw)
            yield line_no, raw


def _read_jsonl(source: Source, unit: Unit) -> Iterator[Sample]:
    for line_no, raw in _unit_lines(source, unit):
        if not raw.strip():
            continue  # blank lines are layout, not records
        where, key = f"line {line_no}", f"{line_no:09d}"
        try:
            record = parse_record(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield Sample(where, key, RecordRejected("malformed_json", f"not UTF-8 ({e})"))
            continue
        except RecordRejected as e:
            yield Sample(where, key, e)
            continue
        yield Sample(where, key, record, [source.images_dir / p for p in record.image_paths])


# ----------------------------------------------------------------------------- webdataset


def _split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the file name, the extension
    the rest ("d/000123.seg.png" -> "d/000123", "seg.png"); a name without a dot belongs to no sample."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _tar_samples(raw: BinaryIO, wanted: set[str]) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Stream a tar shard as (key, {extension: bytes}): consecutive members sharing a key, only the
    `wanted` extensions read (the others map to None). A repeated extension starts a new sample.

    Raises RecordRejected unreadable_file when the first header cannot be read, and truncated_shard
    when the shard is cut short: the samples before the break have been yielded, the one being
    read is lost. A cut on a member boundary raises no error in tarfile; the missing end-of-archive
    block (a zero block right after the last member) tells it.
    """
    try:
        tar = tarfile.open(fileobj=raw, mode="r|*")
    except TAR_ERRORS as e:
        raise RecordRejected("unreadable_file", f"not a tar archive ({e})") from None
    key, members = None, {}
    with tar:
        try:
            for member in tar:
                split = _split_member_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                member_key, extension = split
                if member_key != key or extension in members:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                members[extension] = tar.extractfile(member).read() if extension in wanted else None
            ended_cleanly = tar.fileobj.tell() - tar.offset == tarfile.BLOCKSIZE
        except TAR_ERRORS as e:
            raise RecordRejected("truncated_shard", f"cut inside sample {key} ({e})") from None
    if not ended_cleanly:
        raise RecordRejected("truncated_shard", f"ends without the end-of-archive block; sample {key} lost")
    if key is not None:
        yield key, members


def _webdataset_record(key: str, members: dict[str, bytes | None], keys: dict) -> tuple[Record, bytes]:
    text_ext = _first_present(members, keys["text_key"])
    if text_ext is None:
        raise RecordRejected("empty_text", f"no .{'/.'.join(keys['text_key'])} member")
    try:
        text = members[text_ext].decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordRejected("invalid_record", f"{key}.{text_ext} is not UTF-8 ({e})") from None
    record = record_from_object({"type": "caption", "image": key, "text": text})
    image_ext = _first_present(members, keys["image_key"])
    if image_ext is None:
        raise RecordRejected("missing_image", f"no .{'/.'.join(keys['image_key'])} member")
    return record, members[image_ext]


def _plan_files(source: Source, unit_samples: int) -> list[Unit]:
    """One unit per input file (webdataset: how many samples a tar holds is known only by reading it)."""
    return [Unit(index, index, path.name, path.stat().st_size) for index, path in enumerate(source.files)]


def _read_webdataset(source: Source, unit: Unit) -> Iterator[Sample]:
    wanted = set(source.keys["text_key"]) | set(source.keys["image_key"])
    shard, index = source.files[unit.file], 0
    with open(shard, "rb") as raw:
        try:
            for tar_key, members in _tar_samples(raw, wanted):
                where, key = f"{shard.name} key {tar_key}", f"{unit.file:06d}{index:09d}"
                index += 1
                try:
                    record, image = _webdataset_record(tar_key, members, source.keys)
                except RecordRejected as e:
                    yield Sample(where, key, e)
                    continue
                yield Sample(where, key, record, [image])
        except RecordRejected as e:  # the shard is cut or unreadable: count it and go on
            yield Sample(shard.name, f"{unit.file:06d}{index:09d}", e)


# ----------------------------------------------------------------------------- llava


def _llava_record(obj: Any, keys: dict) -> Record:
    """One LLaVA conversation as a chat record: human -> user, gpt -> assistant, system -> system.

    The `<image>` marker in a human turn places the image (the whitespace around it is layout);
    a record with an image and no marker has it first in the first human turn, as LLaVA does.
    """
    if not isinstance(obj, dict):
        raise RecordRejected("invalid_record", "a record must be a JSON object")
    conversations_key = _first_present(obj, keys["conversations_key"])
    turns = obj.get(conversations_key) if conversations_key else None
    if not isinstance(turns, list) or not turns:
        raise RecordRejected("invalid_record", f"'{'/'.join(keys['conversations_key'])}' must be a non-empty list")
    image_key = _first_present(obj, keys["image_key"])
    image = obj.get(image_key) if image_key else None
    if image is not None and (not isinstance(image, str) or not image):
        raise RecordRejected("invalid_record", f"'{image_key}' must be one image path")

    messages, markers = [], 0
    for number, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise RecordRejected("invalid_record", f"turn {number} needs 'from' ({', '.join(LLAVA_ROLES)}) "
                                                   f"and a string 'value', not {speaker!r}")
        role, pieces = LLAVA_ROLES[speaker], turn["value"].split(IMAGE_MARKER)
        if len(pieces) > 1 and role != "user":
            raise RecordRejected("image_marker_mismatch", f"{IMAGE_MARKER} in a {speaker!r} turn")
        markers += len(pieces) - 1
        content = []
        for j, text in enumerate(pieces):
            if j > 0:
                content.append({"image": image})
            text = text.lstrip() if j > 0 else text
            text = text.rstrip() if j < len(pieces) - 1 else text
            if text:
                content.append({"text": text})
        messages.append({"role": role, "content": content})

    if image is None and markers:
        raise RecordRejected("image_marker_mismatch", f"{IMAGE_MARKER} without an image")
    if markers > 1:
        raise RecordRejected("image_marker_mismatch", f"{markers} {IMAGE_MARKER} markers for one image")
    if image and markers == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RecordRejected("invalid_record", "an image but no human turn to hold it")
        first_user["content"].insert(0, {"image": image})
    return record_from_object({"type": "chat", "messages": messages})


def _is_json_list(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte order mark is allowed
    return head.startswith(b"[")


def _plan_llava(source: Source, unit_samples: int) -> list[Unit]:
    """JSONL: units of lines. A JSON list is parsed whole, here, once (LLaVA ships it so; memory is
    a few times the file's size), and each unit carries its records to the process reading it."""
    path = source.files[0]
    if not _is_json_list(path):
        return _plan_lines(source, unit_samples)
    try:
        with open(path, "rb") as f:
            records = json.load(f)
    except ValueError as e:  # UnicodeDecodeError included
        raise DataError(f"{path} is not valid JSON ({e})") from None
    size, count = path.stat().st_size, len(records)
    units = []
    for index, start in enumerate(range(0, count, unit_samples)):
        stop = min(start + unit_samples, count)
        units.append(Unit(index, 0, f"{path.name} records {start + 1}-{stop}",
                          size * stop // count - size * start // count, start, stop, records=records[start:stop]))
    return units


def _llava_objects(source: Source, unit: Unit) -> Iterator[tuple[str, str, Any]]:
    """(where, key, parsed object or RecordRejected) for each record of a JSON-list or JSONL unit."""
    if unit.records is not None:
        for number, obj in enumerate(unit.records, start=unit.start + 1):
            yield f"record {number}", f"{number:09d}", obj
        return
    for line_no, raw in _unit_lines(source, unit):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError included
            obj = RecordRejected("malformed_json", str(e))
        yield f"line {line_no}", f"{line_no:09d}", obj


def _read_llava(source: Source, unit: Unit) -> Iterator[Sample]:
    for where, key, obj in _llava_objects(source, unit):
        if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)):
            where += f" (id {obj['id']})"
        try:
            if isinstance(obj, RecordRejected):
                raise obj
            record = _llava_record(obj, source.keys)
        except RecordRejected as e:
            yield Sample(where, key, e)
            continue
        yield Sample(where, key, record, [source.images_dir / p for p in record.image_paths])


# ----------------------------------------------------------------------------- parquet


# (format, key) -> the column type it wants, as said in the refusal of another.
PARQUET_COLUMN_TYPES = {
    ("parquet-caption", "image_key"): "binary or struct<bytes: binary, path: string>",
    ("parquet-caption", "text_key"): "string",
    ("parquet-interleaved", "image_key"): "list of binary or of struct<bytes: binary, path: string>",
    ("parquet-interleaved", "text_key"): "list of string",
}


def _column_type_fits(input_format: str, key: str, column_type) -> bool:
    """Images are raw bytes or Hugging Face datasets' Image feature (struct<bytes, path>)."""
    import pyarrow as pa

    def is_image(t) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and is_image(t.field("bytes").type)

    def is_text(t) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    fits = is_image if key == "image_key" else is_text
    if input_format == "parquet-interleaved":
        is_list = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
        return is_list and fits(column_type.value_type)
    return fits(column_type)


def _parquet_columns(path: Path, schema, source: Source) -> dict[str, str]:
    """key -> the column it names in this file; DataError when one is absent or of the wrong type."""
    columns = {}
    for key in ("image_key", "text_key"):
        flag, alternatives = f"--{key.replace('_', '-')}", source.keys[key]
        name = _first_present(schema.names, alternatives)
        if name is None:
            raise DataError(f"{path} has no column {' or '.join(alternatives)} (its columns: "
                            f"{', '.join(schema.names)}); name the right one with {flag}")
        column_type = schema.field(name).type
        if not _column_type_fits(source.input_format, key, column_type):
            urls = key == "image_key" and "string" in str(column_type)
            hint = " (URLs? download the images first, e.g. with img2dataset)" if urls else ""
            raise DataError(f"{path}: column {name} is {column_type}, not "
                            f"{PARQUET_COLUMN_TYPES[source.input_format, key]}{hint}; name the right one with {flag}")
        columns[key] = name
    return columns


def _check_parquet_columns(source: Source) -> None:
    """Check every file's columns up front (footers only), so a wrong key fails before any work.
    A file whose footer cannot be read is left to the reader, which counts it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in source.files:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError):
            continue
        _parquet_columns(path, schema, source)


def _image_bytes(value: Any) -> bytes | None:
    """The bytes of a parquet image cell (plain bytes or {"bytes", "path"}), None when absent."""
    return value.get("bytes") if isinstance(value, dict) else value


def _caption_row(image: Any, text: str | None, where: str) -> tuple[Record, list[bytes]]:
    record = record_from_object({"type": "caption", "image": where, "text": text or ""})
    data = _image_bytes(image)
    if data is None:
        path = image.get("path") if isinstance(image, dict) else None
        raise RecordRejected("missing_image", f"no image bytes (path {path!r})" if path else "no image")
    return record, [data]


def _interleaved_row(images: list | None, texts: list | None, where: str) -> tuple[Record, list[bytes]]:
    """OBELICS layout: position i holds a text or an image, the other list a null."""
    if images is None or texts is None or len(images) != len(texts):
        raise RecordRejected("invalid_record", "texts and images must be lists of the same length")
    segments, blobs = [], []
    for position, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise RecordRejected("invalid_record", f"position {position} holds "
                                                   f"{'neither' if text is None else 'both'} a text and an image")
        if text is not None:
            segments.append({"text": text})
            continue
        data = _image_bytes(image)
        if data is None:
            raise RecordRejected("missing_image", f"position {position} has no image bytes")
        segments.append({"image": f"{where} position {position}"})
        blobs.append(data)
    return record_from_object({"type": "interleaved", "segments": segments}), blobs


def _plan_parquet(source: Source, unit_samples: int) -> list[Unit]:
    """Units of `unit_samples` rows of each file, from its footer. A file whose footer cannot be
    read is one unit, whose reader counts it unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    units = []
    for file, path in enumerate(source.files):
        size = path.stat().st_size
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError):
            rows = 0
        if rows == 0:
            units.append(Unit(len(units), file, path.name, size))
            continue
        for start in range(0, rows, unit_samples):
            stop = min(start + unit_samples, rows)
            units.append(Unit(len(units), file, f"{path.name} rows {start}-{stop - 1}",
                              size * stop // rows - size * start // rows, start, stop))
    return units


def _row_groups(metadata, start: int, stop: int | None) -> tuple[list[int], int]:
    """The row groups holding rows start..stop-1, and the number of the first row of the first one."""
    groups, first_row, row = [], None, 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if row + rows > start and (stop is None or row < stop):
            groups.append(group)
            first_row = row if first_row is None else first_row
        row += rows
    return groups, start if first_row is None else first_row


def _read_parquet(source: Source, unit: Unit) -> Iterator[Sample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_record = _caption_row if source.input_format == "parquet-caption" else _interleaved_row
    path, row = source.files[unit.file], unit.start
    try:
        parquet = pq.ParquetFile(path)
        columns = _parquet_columns(path, parquet.schema_arrow, source)
        groups, row = _row_groups(parquet.metadata, unit.start, unit.stop)
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups,
                                       columns=list(columns.values())) if groups else []
        for batch in batches:
            images = batch.column(columns["image_key"]).to_pylist()
            texts = batch.column(columns["text_key"]).to_pylist()
            for image, text in zip(images, texts):
                if unit.stop is not None and row >= unit.stop:
                    return
                where, key = f"{path.name} row {row}", f"{unit.file:06d}{row:09d}"
                row += 1
                if row <= unit.start:
                    continue  # the row group began before the unit
                try:
                    record, blobs = make_record(image, text, where)
                except RecordRejected as e:
                    yield Sample(where, key, e)
                    continue
                yield Sample(where, key, record, blobs)
    except (pa.ArrowException, OSError) as e:  # a damaged file: count it, keep the rows read, go on
        row = max(row, unit.start)
        yield Sample(f"{path.name} row {row}", f"{unit.file:06d}{row:09d}",
                     RecordRejected("unreadable_file", f"from row {row} on ({e})"))


_PLANNERS: dict[str, Callable[[Source, int], list[Unit]]] = {
    "jsonl": _plan_lines,
    "webdataset": _plan_files,
    "llava": _plan_llava,
    "parquet-caption": _plan_parquet,
    "parquet-interleaved": _plan_parquet,
}
_READERS: dict[str, Callable[[Source, Unit], Iterator[Sample]]] = {
    "jsonl": _read_jsonl,
    "webdataset": _read_webdataset,
    "llava": _read_llava,
    "parquet-caption": _read_parquet,
    "parquet-interleaved": _read_parquet,
}
