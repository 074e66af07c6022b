"""`mm1 data prepare` and `mm1 data merge`: validate a corpus and its images, write tar shards and a manifest.

The input is read by one of readers.py's readers (jsonl, webdataset, llava, parquet-caption,
parquet-interleaved) and cut into units that depend only on the input and `unit_samples`
(readers.Unit: a webdataset file, 10,000 lines or rows...). Each unit is prepared on its own into
its own shards, `{kind}-u{unit:06d}-{n:04d}.tar`, whose sample keys name input records, and the
manifest lists the shards in unit order. So the prepared folder is byte-identical whatever the
number of worker processes (`workers`) and of tasks (`num_tasks`: task i takes the units u with
u % num_tasks == i, on any machine that shares the output folder).

Every bad record is skipped and counted under one reason (the first problem found); no record
can stop the run. Images are fully decoded once here so that training never meets an
undecodable one; the original bytes are stored, so the shards do not depend on the image size.

Commit protocol, in OUT/parts/ until the final manifest exists:
    tmp/                                   shards being written, under temporary names
    part-IIIII-of-TTTTT.commits.jsonl      task I's journal: its settings, then one line per committed unit
    part-IIIII-of-TTTTT.json               task I's part-manifest, written once all its units are committed
A unit is committed when its shards, written to tmp/ and synced, have been renamed into OUT and
its line (shard names, sizes, sha256, counts) has been appended to the journal and synced. A task
re-run with the same arguments keeps its committed units and deletes whatever an interrupted unit
left. `merge` (or a single-task `prepare` itself) combines the parts into manifest.json and
removes parts/.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
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
    shard_unit,
    write_manifest,
)
from megatron_mm1.data.images import MAX_IMAGE_PIXELS, ImageRejected, load_image
from megatron_mm1.data.readers import UNIT_SAMPLES, Sample, Source, Unit, open_source

# PIL format name -> file extension used inside the shard.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
PARTS = "parts"
MAX_EXAMPLES = 10  # skipped records reported per unit and per run
_PART_FILE = re.compile(r"part-(\d+)-of-(\d+)\.(json|commits\.jsonl)")
# A test hook (tests/test_data_parallel_prepare.py): the task SIGKILLs itself once it has committed
# this many units in one run, as a node failure would kill it.
KILL_AFTER_UNITS_ENV = "MM1_PREPARE_KILL_AFTER_UNITS"


@dataclass
class PrepareResult:
    written: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few "where: reason: detail" for the report
    units: int = 0  # the task's units (all of them for a single task or a merge)
    resumed: int = 0  # of which an earlier, interrupted run had committed
    already_prepared: bool = False  # the folder was finished before: nothing was done

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def summary(self) -> dict:
        return {"written": self.written, "skipped": self.skipped, "skipped_by_reason": dict(self.skipped_by_reason)}

    @classmethod
    def of_units(cls, records: list[dict], resumed: int = 0) -> PrepareResult:
        """The totals of units' commit records (in unit order, for the examples)."""
        result = cls(units=len(records), resumed=resumed)
        for record in records:
            result.written += record["written"]
            result.skipped_by_reason.update(record["skipped_by_reason"])
            result.examples.extend(record["examples"][: MAX_EXAMPLES - len(result.examples)])
        return result


# ----------------------------------------------------------------------------- one unit


class _ShardWriter:
    """Writes one unit's samples of one kind into numbered tar shards, rolling over by count or size.

    A shard is written to parts/tmp under a name of its own (other processes may be writing the
    same unit: a killed task's orphaned worker) and renamed into place once complete and synced.
    """

    def __init__(self, out_dir: Path, kind: str, unit: int, samples_per_shard: int, max_shard_bytes: int):
        self.out_dir, self.kind, self.unit = out_dir, kind, unit
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.shards: list[dict] = []
        self.file: io.BufferedWriter | None = None
        self.tar: tarfile.TarFile | None = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # fixed metadata: the same input gives byte-identical shards
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def _temporary(self, name: str) -> Path:
        return self.out_dir / PARTS / "tmp" / f"{name}.{os.getpid()}"

    def write(self, key: str, segments: list[dict], images: list[tuple[str, bytes]]) -> None:
        current = self.shards[-1] if self.shards else None
        if self.tar is None or current["samples"] >= self.samples_per_shard or self.file.tell() >= self.max_shard_bytes:
            self.close()
            self.shards.append({"name": shard_name(self.kind, self.unit, len(self.shards)), "samples": 0, "images": 0})
            self.file = open(self._temporary(self.shards[-1]["name"]), "wb")
            self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
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
        self.file.flush()
        os.fsync(self.file.fileno())  # the journal may say committed only once the bytes are on disk
        self.file.close()
        self.tar = self.file = None
        shard = self.shards[-1]
        temporary = self._temporary(shard["name"])
        shard["bytes"] = temporary.stat().st_size
        shard["sha256"] = sha256_file(temporary)
        os.replace(temporary, self.out_dir / shard["name"])


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


@dataclass
class _UnitPreparer:
    """Prepares units into their own shards; sent once to each worker process."""

    source: Source
    out_dir: Path
    samples_per_shard: int
    max_shard_bytes: int
    max_pixels: int

    def prepare(self, unit: Unit) -> dict:
        """Check and write one unit's samples; return its commit record (shards per kind, counts)."""
        writers = {k: _ShardWriter(self.out_dir, k, unit.index, self.samples_per_shard, self.max_shard_bytes)
                   for k in KINDS}
        written, skipped, examples = 0, Counter(), []
        for sample in self.source.samples(unit):
            try:
                if isinstance(sample.record, RecordRejected):
                    raise sample.record
                blobs = _checked_images(sample, self.max_pixels)
            except RecordRejected as e:
                skipped[e.reason] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(f"{sample.where}: {e}")
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
            written += 1
        for writer in writers.values():
            writer.close()
        return {"unit": unit.index, "written": written, "skipped_by_reason": dict(skipped), "examples": examples,
                "kinds": {kind: writer.shards for kind, writer in writers.items() if writer.shards}}


# ----------------------------------------------------------------------------- units in parallel


def _error(e: Exception) -> str:
    """What made a unit fail, for the command's message; an unexpected exception (not an OSError:
    a full disk, an I/O error) also gets its traceback printed, from the process it happened in."""
    if not isinstance(e, OSError):
        traceback.print_exception(e, file=sys.stderr)
    return f"{type(e).__name__}: {e}"


def _worker(conn: Connection, preparer: _UnitPreparer) -> None:
    """A worker process: prepare the units the task sends until it closes the pipe (or dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the task's to handle: it stops the workers
    while True:
        try:
            unit = conn.recv()
        except EOFError:
            return
        try:
            reply = (preparer.prepare(unit), None)
        except Exception as e:  # a bad record is never an exception: this is the environment's or a bug
            reply = (None, _error(e))
        try:
            conn.send(reply)
        except BrokenPipeError:  # the task is gone; what this unit wrote is not committed
            return


def _in_this_process(preparer: _UnitPreparer, units: list[Unit]) -> Iterator[tuple[Unit, dict | None, str | None]]:
    for unit in units:
        try:
            record = preparer.prepare(unit)
        except Exception as e:  # a bad record is never an exception: this is the environment's or a bug
            yield unit, None, _error(e)
            return
        yield unit, record, None


def _give(conn: Connection, unit: Unit) -> Unit:
    """Send a unit to a worker; return it."""
    try:
        conn.send(unit)
    except OSError:
        pass  # the worker is dead: the end of its pipe says so when its reply is awaited
    return unit


def _in_workers(preparer: _UnitPreparer, units: list[Unit],
                workers: int) -> Iterator[tuple[Unit, dict | None, str | None]]:
    """Deal the units out to worker processes, one at a time each, as they finish; after a failure,
    deal no more and wait for the running ones.

    Each worker has a pipe of its own, so a worker that dies is known with its unit; and one whose
    task is killed reads the end of its pipe and exits.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
    todo = list(reversed(units))  # popped from the end: in unit order
    running: dict[Connection, tuple[multiprocessing.Process, Unit]] = {}
    processes, failed, finished = [], False, False
    try:
        for _ in range(min(workers, len(units))):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(theirs, preparer), daemon=True)
            process.start()
            theirs.close()
            processes.append((ours, process))
            running[ours] = (process, _give(ours, todo.pop()))
        while running:
            for conn in wait(list(running)):
                process, unit = running.pop(conn)
                try:
                    record, error = conn.recv()
                except (EOFError, OSError):  # killed (out of memory?) or crashed in a C library
                    process.join()
                    record, error = None, f"its worker process died (exit code {process.exitcode})"
                failed |= error is not None
                yield unit, record, error
                if todo and not failed:
                    running[conn] = (process, _give(conn, todo.pop()))
        finished = True
    finally:
        for conn, process in processes:
            conn.close()  # the worker reads the end of its pipe and exits
            if not finished:
                process.terminate()  # its unit is not committed: stop now
            process.join()


def _prepared_units(preparer: _UnitPreparer, units: list[Unit], workers: int) -> Iterator[tuple[Unit, dict]]:
    """(unit, commit record) for each unit as it is done, in this process or in `workers` processes.

    A unit that fails (not a bad record: an I/O error, a full disk, a bug, a killed worker) raises
    DataError naming it, once the units still running are done.
    """
    failures = []
    outcomes = _in_this_process(preparer, units) if workers == 1 else _in_workers(preparer, units, workers)
    for unit, record, error in outcomes:
        if error is None:
            yield unit, record
        else:
            failures.append(f"unit {unit.index} ({unit.where}): {error}")
    if failures:
        raise DataError(f"{'; '.join(failures)}. The units committed so far are kept: fix the cause and re-run "
                        "the same command to continue")


# ----------------------------------------------------------------------------- journal and parts


def _write_json(path: Path, obj: dict) -> None:
    """One line of JSON, written atomically: never half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(obj, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None


def _part_stem(task_index: int, num_tasks: int) -> str:
    return f"part-{task_index:05d}-of-{num_tasks:05d}"


def _read_journal(path: Path) -> tuple[dict, dict[int, dict], int]:
    """(settings, unit -> commit record, bytes of whole lines) of a journal. A line cut short (the
    task was killed while appending it) and anything after it commit nothing."""
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    settings, records, valid = json.loads(lines[0])["settings"], {}, len(lines[0])
    for line in lines[1:]:
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            record = None
        if record is None:
            break
        records[record["unit"]] = record  # a unit committed again (its shards were lost): the last line holds
        valid += len(line)
    return settings, records, valid


class _Journal:
    """A task's commit log: its settings on the first line, then one line per committed unit."""

    def __init__(self, path: Path, settings: dict):
        if not path.exists():
            _write_json(path, {"settings": settings})
        _, self.records, valid = _read_journal(path)
        os.truncate(path, valid)  # drop a line cut short by a kill
        self.file = open(path, "ab")

    def commit(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=True).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.records[record["unit"]] = record

    def close(self) -> None:
        self.file.close()


def _recorded_settings(out_dir: Path) -> Iterator[tuple[Path, dict]]:
    """(file, settings) of every journal and part-manifest in out_dir/parts."""
    parts = out_dir / PARTS
    for path in sorted(parts.iterdir()) if parts.is_dir() else []:
        match = _PART_FILE.fullmatch(path.name)
        if match and match[3] == "json":
            yield path, _read_json(path)["settings"]
        elif match:
            yield path, _read_journal(path)[0]


def _flat(settings: dict) -> dict:
    return {name: value for group in settings.values() for name, value in group.items()}


def _differences(there: dict, here: dict) -> str:
    """'name: X there, Y here' for each setting that differs."""
    there, here = _flat(there), _flat(here)
    names = sorted(name for name in there.keys() | here.keys() if there.get(name) != here.get(name))
    return "; ".join(f"{name}: {there.get(name)!r} there, {here.get(name)!r} here" for name in names)


def _broken_shard(out_dir: Path, record: dict) -> str | None:
    """The name of the first of a unit's shards that is missing or not its recorded size, if any."""
    for shards in record["kinds"].values():
        for shard in shards:
            path = out_dir / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                return shard["name"]
    return None


def _remove_leftovers(out_dir: Path, units: set[int]) -> None:
    """Delete the shards and temporary files an interrupted run left of these (uncommitted) units."""
    for folder in (out_dir, out_dir / PARTS / "tmp"):
        for path in folder.iterdir():
            if shard_unit(path.name) in units:
                path.unlink()


def _finished_result(manifest: dict) -> PrepareResult:
    units = manifest.get("prepare", {}).get("units", 0)
    return PrepareResult(manifest["written"], Counter(manifest["skipped_by_reason"]), units=units, resumed=units,
                         already_prepared=True)


def _check_out_folder(out_dir: Path, settings: dict, task_settings: dict) -> dict | None:
    """The manifest when out_dir already holds this preparation, finished; None when it holds none
    or this one unfinished; DataError when it holds another one."""
    if (out_dir / MANIFEST).exists():
        manifest = _read_json(out_dir / MANIFEST)
        recorded = {"source": manifest.get("source"), "prepare": manifest.get("prepare")}
        if recorded == settings:
            return manifest
        differences = f" ({_differences(recorded, settings)})" if recorded["prepare"] else ""
        raise DataError(f"{out_dir} already holds prepared data{differences}; choose an empty --out folder, "
                        "or give the arguments it was prepared with")
    for path, recorded in _recorded_settings(out_dir):
        if recorded != task_settings:
            raise DataError(f"{out_dir} is being prepared with other settings ({path.relative_to(out_dir)}: "
                            f"{_differences(recorded, task_settings)}); run every task with the same arguments, "
                            "or choose an empty --out folder")
    if not (out_dir / PARTS).is_dir() and any(out_dir.glob("*.tar")):
        raise DataError(f"{out_dir} already holds prepared data (.tar files); choose an empty --out folder")
    return None


def _finalize(out_dir: Path, settings: dict, records: list[dict]) -> PrepareResult:
    """Write manifest.json from every unit's commit record, shards in unit order; remove parts/."""
    kinds = {}
    for kind in KINDS:
        shards = [shard for record in records for shard in record["kinds"].get(kind, [])]
        if shards:
            kinds[kind] = {"samples": sum(s["samples"] for s in shards), "images": sum(s["images"] for s in shards),
                           "shards": shards}
    result = PrepareResult.of_units(records)
    write_manifest(out_dir, {"version": FORMAT_VERSION, **settings, "kinds": kinds, **result.summary()})
    shutil.rmtree(out_dir / PARTS)
    return result


# ----------------------------------------------------------------------------- prepare and merge


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
    workers: int = 1,
    num_tasks: int = 1,
    task_index: int = 0,
    unit_samples: int = UNIT_SAMPLES,
) -> PrepareResult:
    """Convert a corpus (readers.FORMATS) into shards under out_dir; return the counts (also in the manifest).

    images_dir is the folder jsonl and llava image paths are relative to (None for the formats
    that carry their images); the keys are comma-separated field names, None for the defaults.
    `workers` processes share this task's units; with num_tasks > 1 this is task `task_index`,
    which writes its shards and its part-manifest, and `merge` writes the manifest once every task
    is done. An interrupted run continues when re-run with the same arguments.
    """
    for name, value in (("workers", workers), ("num_tasks", num_tasks), ("unit_samples", unit_samples),
                        ("samples_per_shard", samples_per_shard)):
        if value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if not 0 <= task_index < num_tasks:
        raise DataError(f"task index {task_index} is outside 0..{num_tasks - 1} (with {num_tasks} tasks)")
    source = open_source(input_format, input_path, images_dir, text_key, image_key, conversations_key)
    units = source.plan(unit_samples)
    # What makes the output: the same settings give the same folder (its manifest records them).
    settings = json.loads(json.dumps({
        "source": source.describe(),
        "prepare": {"units": len(units), "unit_samples": unit_samples, "samples_per_shard": samples_per_shard,
                    "max_shard_bytes": max_shard_bytes, "max_pixels": max_pixels,
                    "input_files": len(source.files), "input_bytes": source.total_bytes},
    }))
    task_settings = {**settings, "tasks": {"num_tasks": num_tasks}}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _check_out_folder(out_dir, settings, task_settings)
    if manifest is not None:
        shutil.rmtree(out_dir / PARTS, ignore_errors=True)  # left if a run was killed right after the manifest
        return _finished_result(manifest)

    (out_dir / PARTS / "tmp").mkdir(parents=True, exist_ok=True)
    stem = _part_stem(task_index, num_tasks)
    mine = [unit for unit in units if unit.index % num_tasks == task_index]
    journal = _Journal(out_dir / PARTS / f"{stem}.commits.jsonl", task_settings)
    try:
        done = {u.index for u in mine if u.index in journal.records
                and _broken_shard(out_dir, journal.records[u.index]) is None}
        todo = [unit for unit in mine if unit.index not in done]
        _remove_leftovers(out_dir, {unit.index for unit in todo})
        preparer = _UnitPreparer(source, out_dir, samples_per_shard, max_shard_bytes, max_pixels)
        kill_after = int(os.environ.get(KILL_AFTER_UNITS_ENV, "0"))
        written = skipped = 0
        with tqdm(total=sum(u.bytes for u in mine), initial=sum(u.bytes for u in mine if u.index in done),
                  unit="B", unit_scale=True, desc="prepare" if num_tasks == 1 else f"task {task_index}/{num_tasks}",
                  disable=not progress) as bar:
            for count, (unit, record) in enumerate(_prepared_units(preparer, todo, workers), start=1):
                journal.commit(record)
                if count == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                written += record["written"]
                skipped += sum(record["skipped_by_reason"].values())
                bar.update(unit.bytes)
                bar.set_postfix(units=f"{len(done) + count}/{len(mine)}", written=written, skipped=skipped,
                                refresh=False)
        records = [journal.records[unit.index] for unit in mine]
    finally:
        journal.close()
    _write_json(out_dir / PARTS / f"{stem}.json",
                {"settings": task_settings, "task_index": task_index, "units": records})
    result = PrepareResult.of_units(records, resumed=len(done))
    if num_tasks == 1:
        _finalize(out_dir, settings, records)
    return result


def merge(out_dir: str | Path) -> PrepareResult:
    """Combine the part-manifests of a multi-task preparation into out_dir's manifest.json.

    Refuses, naming them, parts that are missing or unfinished, of different task counts or made
    with different settings, and committed shards that are missing or truncated.
    """
    out_dir = Path(out_dir)
    parts_dir = out_dir / PARTS
    if not parts_dir.is_dir():
        if (out_dir / MANIFEST).is_file():
            return _finished_result(_read_json(out_dir / MANIFEST))
        raise DataError(f"{out_dir} holds no parts to merge (no {PARTS}/ folder): run its "
                        "`mm1 data prepare --num-tasks T --task-index I` tasks first")
    found = [(path.name, int(match[2])) for path in sorted(parts_dir.iterdir())
             if (match := _PART_FILE.fullmatch(path.name))]
    counts = sorted({count for _, count in found})
    if not counts:
        raise DataError(f"{parts_dir} holds no part-manifests: run the `mm1 data prepare` tasks first")
    if len(counts) > 1:
        raise DataError(f"cannot merge {out_dir}: its parts are of different task counts ({', '.join(map(str, counts))}): "
                        f"{', '.join(name for name, _ in found)}; prepare again into an empty folder")
    num_tasks, problems, parts = counts[0], [], []
    for index in range(num_tasks):
        stem = _part_stem(index, num_tasks)
        if (parts_dir / f"{stem}.json").is_file():
            parts.append((f"{stem}.json", _read_json(parts_dir / f"{stem}.json")))
        elif (parts_dir / f"{stem}.commits.jsonl").is_file():
            settings, records, _ = _read_journal(parts_dir / f"{stem}.commits.jsonl")
            expected = len(range(index, settings["prepare"]["units"], num_tasks))
            problems.append(f"part {index} of {num_tasks} is incomplete ({stem}.commits.jsonl: {len(records)} of "
                            f"{expected} units committed, no {stem}.json)")
        else:
            problems.append(f"part {index} of {num_tasks} is missing (no {stem}.json)")
    if problems:
        raise DataError(f"cannot merge {out_dir}: {'; '.join(problems)}. Run those tasks (--num-tasks {num_tasks} "
                        "--task-index I, same arguments otherwise): they continue where they stopped")

    first_name, first = parts[0]
    for name, part in parts[1:]:
        if part["settings"] != first["settings"]:
            raise DataError(f"cannot merge {out_dir}: {name} was made with other settings than {first_name} "
                            f"({_differences(first['settings'], part['settings'])}); re-run that task with the "
                            "same arguments as the others into an empty folder")
    settings = first["settings"]
    total = settings["prepare"]["units"]
    records = {}
    for index, (name, part) in enumerate(parts):
        units = [record["unit"] for record in part["units"]]
        if part["task_index"] != index or units != list(range(index, total, num_tasks)):
            raise DataError(f"cannot merge {out_dir}: {name} is incomplete (it holds units other than task "
                            f"{index}'s); run task {index} again")
        for record in part["units"]:
            broken = _broken_shard(out_dir, record)
            if broken:
                raise DataError(f"cannot merge {out_dir}: shard {broken} (unit {record['unit']}, task {index}) is "
                                f"missing or truncated; run task {index} again (--task-index {index}): it redoes "
                                "that unit")
            records[record["unit"]] = record
    return _finalize(out_dir, {"source": settings["source"], "prepare": settings["prepare"]},
                     [records[unit] for unit in range(total)])
