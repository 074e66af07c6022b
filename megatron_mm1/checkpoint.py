"""Checkpoints on megatron-core's dist_checkpointing.

A checkpoint is a folder:

    CKPT/config.yaml   the resolved config it was trained with
    CKPT/model/        the weights, a dist_checkpointing folder: loadable at any TP/PP/EP layout

Model weights are saved apart from everything else so that conversion and layout changes read
only them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mm1.config import Config, ConfigError, RunRefused, _build, config_to_dict

if TYPE_CHECKING:
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest


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


EXTRA_STATE = "._extra_state"


def model_sharded_state_dict(model: list[torch.nn.Module]) -> dict:
    """megatron-core sharded state dict of this rank's model chunks, without the layers'
    `_extra_state` objects: megatron's own linears save None there and Transformer Engine's
    their FP8 scaling factors, which no setting here uses. Without them a checkpoint loads
    into every layer spec (models/te_spec.py); older checkpoints keep theirs, unread."""
    return {
        f"chunk{i}": {k: v for k, v in _unwrap(chunk).sharded_state_dict().items() if not k.endswith(EXTRA_STATE)}
        for i, chunk in enumerate(model)
    }


def save_sharded(state: dict, path: Path, background: bool = False) -> AsyncRequest | None:
    """Save this rank's part of a megatron-core sharded state dict into the new
    dist_checkpointing folder `path`. Collective over all ranks; a failure on any rank raises
    on every rank. `background`: plan the save and return megatron's AsyncRequest, whose
    writing BackgroundSaves runs in a forked process."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _fail_together(functools.partial(path.mkdir, parents=True) if torch.distributed.get_rank() == 0 else None)
    # megatron's writer hands a save's results back through a queue that it takes from this
    # module global when the save is planned. Its own, made once per process, is a spawn-started
    # multiprocessing Manager, whose server imports torch (seconds per rank on the first save)
    # and which every save in flight shares. A queue per save instead: in this process for a
    # synchronous save, a pipe inherited by the forked writer for a background one.
    filesystem_async._results_queue = multiprocessing.get_context("fork").Queue() if background else queue.Queue()
    strategy = _agreeing_save_strategy()
    request = dist_checkpointing.save(state, str(path), strategy, async_sharded_save=True)
    *write_finalizers, megatron_format_finalizer = request.finalize_fns
    if getattr(megatron_format_finalizer, "__name__", None) != "metadata_finalize_fn":
        raise RuntimeError("megatron-core's dist_checkpointing.save no longer ends its finalization with "
                           "metadata_finalize_fn: update checkpoint.save_sharded for this version")
    request = request._replace(finalize_fns=[*write_finalizers, functools.partial(_write_format, strategy, path)])
    if background:
        return request
    request.execute_sync()  # what megatron's synchronous save does, with these finalizers
    return None


# megatron's save lets a rank fail alone in three places: rank 0 writing common.pt, the
# coordinator writing .metadata, rank 0 writing metadata.json. The others then wait forever in
# its next collective (seen on a full disk with background saves). These strategies and
# finalizers make each such failure raise on every rank (_fail_together), as megatron already
# does for a failed shard write.


def _agreeing_save_strategy():
    """megatron's default save format (torch_dist) with _finalize_write; its common.pt writer
    made to agree too, by registering it as the default (dist_checkpointing.save accepts no
    other common strategy)."""
    from megatron.core.dist_checkpointing.strategies.base import StrategyAction, register_default_strategy
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class CommonSave(TorchCommonSaveStrategy):
        def save_common(self, common_state_dict, checkpoint_dir):
            _fail_together(functools.partial(super().save_common, common_state_dict, checkpoint_dir))

    class TorchDistSave(TorchDistSaveShardedStrategy):
        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
            return request._replace(finalize_fns=[functools.partial(_finalize_write, *save_state_dict_ret)])

    register_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1, CommonSave("torch", 1))
    return TorchDistSave("torch_dist", 1)


def _finalize_write(storage_writer, global_metadata, dist_wrapper) -> None:
    """megatron's save_state_dict_async_finalize: the coordinator gathers every rank's write
    results and writes the checkpoint's .metadata, unless a write failed. Here a failure to
    write .metadata fails the save on every rank too."""
    from torch.distributed.checkpoint.utils import _get_failure_dict

    results = dist_wrapper.gather_object(storage_writer.retrieve_write_results())

    def write_metadata() -> None:
        failed = _get_failure_dict(results)
        if failed:
            raise RanksFailed({rank: _one_line(error) for rank, (error, _) in failed.items()})
        storage_writer.finish(global_metadata, results)

    _fail_together(write_metadata if dist_wrapper.is_coordinator else None)


def _write_format(strategy, path: Path) -> None:
    """megatron's metadata_finalize_fn: rank 0 records the format in metadata.json."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig
    from megatron.core.dist_checkpointing.core import save_config as save_format

    config = CheckpointingConfig(strategy.backend, strategy.version)
    _fail_together(functools.partial(save_format, config, str(path)) if torch.distributed.get_rank() == 0 else None)


def save_model(model: list[torch.nn.Module], path: Path, background: bool = False) -> AsyncRequest | None:
    """Save this rank's shards of the weights into the dist_checkpointing folder `path`."""
    return save_sharded(model_sharded_state_dict(model), path, background)


def load_model(model: list[torch.nn.Module], path: Path) -> None:
    """Load weights saved at any layout into this rank's chunks. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    if not Path(path).is_dir():
        raise ConfigError(f"no model weights at {path}")
    loaded = dist_checkpointing.load(model_sharded_state_dict(model), str(path))
    for i, chunk in enumerate(model):
        # Not strict about the `_extra_state` entries alone, which the layers keep their own of.
        incompatible = _unwrap(chunk).load_state_dict(loaded[f"chunk{i}"], strict=False)
        wrong = [k for k in (*incompatible.missing_keys, *incompatible.unexpected_keys) if not k.endswith(EXTRA_STATE)]
        if wrong:
            raise RuntimeError(f"the weights loaded from {path} do not match the model's: {', '.join(wrong[:5])}")


# ----------------------------------------------------------------------------- training runs
#
#   RUN/checkpoints/step_0000100/   config.yaml, model/, optimizer/ (megatron engine) or
#                                   deepspeed/ (deepspeed engine), train_state.json,
#                                   data/dp<k>.json (loader state of data-parallel rank k),
#                                   rng/rank<r>.pt, manifest.json (every other file's size and
#                                   SHA-256)
#   RUN/checkpoints/latest          the newest complete checkpoint's folder name, moved last
#
# A checkpoint is written under a hidden temporary name and renamed when complete, so a folder
# named step_* is always complete; a kill during a save leaves only a temporary folder, which
# --resume never reads and the next run removes. What the rename cannot catch (a file damaged
# or truncated later, a disk that lied about a write) the manifest does: --resume checks every
# file against it first, and falls back to an older checkpoint when one differs.

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"
MANIFEST = "manifest.json"
WRITER_DIGEST = ".sha256"  # beside a file its background writer checksummed, until published
# Files whose name says which rank wrote them: megatron's shards, our RNG states.
_WRITER = re.compile(r"^__(\d+)_\d+\.distcp$|^rank(\d+)\.pt$")


# What a failed write raises: OSError, RuntimeError from torch.save, and torch's
# CheckpointException (a BaseException), which torch's collective steps of a save raise on every
# rank when one failed.
SAVE_ERRORS = (Exception, CheckpointException)


class SaveFailed(Exception):
    """A save failed on some rank (a full disk, an I/O error); the previous checkpoint is intact."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX):])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under RUN/checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `--resume auto` tries first (see resume_candidates), or None."""
    found = resume_candidates(root)
    return found[0] if found else None


def resume_candidates(root: Path) -> list[Path]:
    """The checkpoints `--resume auto` tries, in order: the one `latest` names (or the newest),
    then the older ones, newest first. Checkpoints newer than `latest` belong to a branch the
    run left when it resumed from an older one."""
    found = complete_checkpoints(root)[::-1]
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in found:
            return [p for p in found if checkpoint_step(p) <= checkpoint_step(named)]
    return found


def remove_incomplete(root: Path) -> None:
    """Remove what interrupted saves and prunes left behind (rank 0 only)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of --resume's way, kept for inspection (rank 0 only)."""
    moved = path.with_name(DAMAGED_PREFIX + path.name)
    if moved.exists():
        shutil.rmtree(moved)
    os.replace(path, moved)
    return moved


def begin_save(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into. Collective."""
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "data").mkdir(parents=True)
            (tmp / "rng").mkdir()
        except SAVE_ERRORS as e:
            error = e
    agree_on_errors(error, step, tmp)  # and the folder exists for every rank
    return tmp


def agree_on_errors(error: BaseException | None, step: int, tmp: Path) -> None:
    """Raise SaveFailed on every rank if a save failed on any (after removing its temporary
    folder, to give the space back); every rank calls it at the same point. Collective."""
    failures = gather_failures(error)
    if not failures:
        return
    usage = shutil.disk_usage(tmp.parent)  # before the space is given back
    full = usage.free < 0.01 * usage.total or any(
        word in text for text in failures.values() for word in ("No space left", "quota"))
    torch.distributed.barrier()  # every rank has measured
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    listed = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(failures.items())[:4])
    raise SaveFailed(
        f"saving the checkpoint of step {step} failed ({listed}). "
        f"{usage.free / 2**30:.2f} GiB of {usage.total / 2**30:.2f} GiB were free in {tmp.parent}"
        + (": the disk is full. Free space (or lower checkpoint.keep_last)" if full else ". Fix the cause")
        + ", then resume with --resume auto: the previous checkpoint is intact"
    )


class RanksFailed(Exception):
    """A part of a save failed on some ranks (rank: one line each); raised on every rank."""

    def __init__(self, failures: dict[int, str]):
        super().__init__("; ".join(f"rank {rank}: {text}" for rank, text in sorted(failures.items())))
        self.failures = failures


def _fail_together(write: Callable[[], object] | None) -> None:
    """Run `write` (None: this rank has nothing to write here), then raise RanksFailed on every
    rank if it failed on any. Collective."""
    error = None
    if write is not None:
        try:
            write()
        except SAVE_ERRORS as e:
            error = e
    failures = gather_failures(error)
    if failures:
        raise RanksFailed(failures)


def gather_failures(error: BaseException | None) -> dict[int, str]:
    """Every rank's failures (rank: one line), on every rank; empty if none failed. Collective."""
    reports: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, None if error is None else _failures(error))
    failures = {rank: text for report in reports if report for rank, text in report}
    return failures or {rank: "failed (no detail)" for rank, report in enumerate(reports) if report is not None}


def _failures(error: BaseException) -> list[tuple[int, str]]:
    """(rank, one line) for a failed write. RanksFailed holds every rank's failure; torch's
    CheckpointException (from a collective step of megatron's save) holds every rank's on the
    coordinator and none elsewhere."""
    if isinstance(error, RanksFailed):
        return list(error.failures.items())
    if isinstance(error, CheckpointException):
        return [(rank, _one_line(e)) for rank, (e, _) in error.failures.items()]
    return [(torch.distributed.get_rank(), _one_line(error))]


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def finish_save(root: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Publish a fully written checkpoint: every rank flushes and checksums its share of the
    files, rank 0 writes the manifest, renames the folder, moves `latest`, and prunes old
    checkpoints in the background. Collective."""
    torch.distributed.barrier()  # every rank has written its part
    error = None
    try:
        _write_manifest(tmp)
    except SAVE_ERRORS as e:  # any rank's failure fails the save on all (agree_on_errors)
        error = e
    agree_on_errors(error, step, tmp)
    final = root / step_dir_name(step)
    if torch.distributed.get_rank() == 0:
        try:
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = root / "latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, root / "latest")
        except SAVE_ERRORS as e:  # `latest` still names the previous checkpoint
            error = e
    agree_on_errors(error, step, tmp)
    if torch.distributed.get_rank() == 0:
        _prune_in_background(root, step, keep_last)
    return final


class BackgroundSaves:
    """checkpoint.async_save: megatron-core's asynchronous dist_checkpointing. Training waits
    only while each rank's tensors are staged in host memory (a copy from the GPU; on the CPU
    the fork's copy-on-write snapshot) and a process is forked per folder to write them and
    checksum what it wrote. The loop then polls at every step boundary; when every rank's
    writers have finished, megatron's finalization (the metadata) and finish_save (manifest,
    rename, `latest`) run, on all ranks at the same step. One save at a time: a new one first
    waits for the one in flight."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.calls = AsyncCallsQueue()
        self.pending: tuple[Path, Path, int, int] | None = None  # root, tmp, step, keep_last

    def start(self, requests: list, root: Path, tmp: Path, step: int, keep_last: int) -> None:
        """Fork the writers of `requests` (save_sharded(..., background=True)). Collective."""
        for request in requests:
            if request.async_fn is not None:  # None: nothing to write on this rank
                request = request._replace(async_fn=functools.partial(_write_then_digest, request.async_fn))
            self.calls.schedule_async_request(request)
        self.pending = (root, tmp, step, keep_last)

    def poll(self, wait: bool = False) -> Path | None:
        """The checkpoint published now, if its writers have finished on every rank (`wait`:
        wait until they have). SaveFailed on every rank if a write failed. Collective."""
        if self.pending is None:
            return None
        root, tmp, step, keep_last = self.pending
        error = None
        try:
            self.calls.maybe_finalize_async_calls(blocking=wait)
        except SAVE_ERRORS as e:
            error = e
        if error is not None:
            self.pending = None
        agree_on_errors(error, step, tmp)
        if self.calls.get_num_unfinalized_calls():
            return None
        self.pending = None
        return finish_save(root, tmp, step, keep_last)


def _prune_in_background(root: Path, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step`. Renaming is instant; the deleting,
    minutes for a large checkpoint on a parallel filesystem, runs in a thread while training
    goes on (a temporary name: the next run removes what a kill interrupted)."""
    older = [p for p in complete_checkpoints(root) if checkpoint_step(p) <= step][:-keep_last]
    doomed = []
    for path in older:
        try:
            os.replace(path, root / f"{TMP_PREFIX}prune-{path.name}")
            doomed.append(root / f"{TMP_PREFIX}prune-{path.name}")
        except OSError as e:  # the new checkpoint is safe; an old one more is no reason to stop
            print(f"mm1 train: warning: could not remove {path}: {e}", file=sys.stderr, flush=True)
    if doomed:
        threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in doomed],
                         name="mm1-prune").start()


# ----------------------------------------------------------------------------- verification


def _shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Which rank checksums which file: a file whose name says its writer goes to that rank
    (its fsync then flushes its own writes, which may still be in its page cache), the rest to
    whichever rank has the fewest bytes so far, largest first."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    rest = []
    for name, size in sizes.items():
        match = _WRITER.match(Path(name).name)
        writer = int(match.group(1) or match.group(2)) if match else world
        if writer < world:
            shares[writer].append(name)
            load[writer] += size
        else:
            rest.append(name)
    for name in sorted(rest, key=lambda n: (-sizes[n], n)):
        rank = load.index(min(load))
        shares[rank].append(name)
        load[rank] += sizes[name]
    return shares


def file_sha256(path: Path, sync: bool = False) -> str:
    """The file's SHA-256; `sync`: also flush it to disk (fsync works on a read-only handle)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest


def _file_sizes(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*"))
            if p.is_file() and p != path / MANIFEST and not p.name.endswith(WRITER_DIGEST)}


def _checksums(path: Path, names: list[str], sizes: dict[str, int]) -> dict[str, dict]:
    return {name: {"bytes": sizes[name], "sha256": _digest(path / name)} for name in names}


def _digest(path: Path) -> str:
    """The SHA-256 its background writer left beside the file (consumed), else computed now."""
    left = path.with_name(path.name + WRITER_DIGEST)
    if left.is_file():
        digest = left.read_text()
        left.unlink()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    return file_sha256(path, sync=True)


def _write_then_digest(write, *args, **kwargs) -> None:
    """A background writer (forked): megatron's write of this rank's files (args: rank, write
    buckets, results queue), then each file's SHA-256 beside it, so that publishing the
    checkpoint does not stop training to read them again. A digest that cannot be written (a
    full disk) is left out: publishing computes it."""
    write(*args, **kwargs)
    for file_path, *_ in args[1]:
        if not os.path.isfile(file_path):
            continue
        partial = Path(f"{file_path}.partial{WRITER_DIGEST}")  # the suffix keeps it out of listings
        try:
            partial.write_text(file_sha256(Path(file_path), sync=True))
            os.replace(partial, f"{file_path}{WRITER_DIGEST}")
        except OSError:
            partial.unlink(missing_ok=True)


def _save_manifest(path: Path, files: dict[str, dict]) -> None:
    with open(path / MANIFEST, "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(path: Path) -> None:
    """manifest.json for a checkpoint folder written by this one process (`mm1 convert from-hf`)."""
    sizes = _file_sizes(path)
    _save_manifest(path, _checksums(path, list(sizes), sizes))


def _write_manifest(tmp: Path) -> None:
    """Collective: rank 0 lists the files, every rank flushes and checksums its share, rank 0
    writes manifest.json."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    listing = [_file_sizes(tmp) if rank == 0 else None]
    torch.distributed.broadcast_object_list(listing, src=0)
    sizes = listing[0]
    mine = _checksums(tmp, _shares(sizes, world)[rank], sizes)
    parts: list | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(mine, parts, dst=0)
    if rank == 0:
        _save_manifest(tmp, {name: entry for part in parts for name, entry in part.items()})


class CheckpointDamaged(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def read_manifest(path: Path) -> dict[str, dict]:
    """{relative file name: {"bytes", "sha256"}} of a checkpoint; CheckpointDamaged if none."""
    try:
        return json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointDamaged([f"{MANIFEST} is missing"]) from None
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointDamaged([f"{MANIFEST} is unreadable ({e})"]) from None


def check_file(path: Path, name: str, entry: dict) -> str | None:
    """What is wrong with one file of a checkpoint, or None when it matches its manifest entry."""
    file = path / name
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        return f"{name} has {size} bytes, {entry['bytes']} were saved"
    if file_sha256(file) != entry["sha256"]:
        return f"{name} differs from what was saved (SHA-256)"
    return None


def verify_checkpoint(path: Path, only: str = "", workers: int = 4, progress: bool = False) -> list[str]:
    """What differs between a checkpoint's files (those under `only`, e.g. "model/") and its
    manifest, checked by `workers` threads (hashing releases the GIL); [] when intact."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    try:
        manifest = read_manifest(path)
    except CheckpointDamaged as e:
        return e.problems
    names = sorted(n for n in manifest if n.startswith(only))
    bar = tqdm(total=sum(manifest[n]["bytes"] for n in names), unit="B", unit_scale=True,
               desc=f"verify {path.name}", disable=not progress)

    def check(name: str) -> str | None:
        problem = check_file(path, name, manifest[name])
        bar.update(manifest[name]["bytes"])
        return problem

    with bar, ThreadPoolExecutor(workers) as pool:
        return [p for p in pool.map(check, names) if p]


def checkpoint_folders(path: Path) -> list[Path]:
    """What `--checkpoint PATH` names: a run folder or its checkpoints/ folder, whose checkpoints
    come in --resume auto's order, or one checkpoint (a folder with config.yaml). A run folder
    has a config.yaml too when a Slurm job wrote it (the resolved config): checkpoints/ decides."""
    if (path / "config.yaml").is_file() and not (path / "checkpoints").is_dir():
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = resume_candidates(root)
    if not found:
        raise ConfigError(f"{path} is not an MM1 checkpoint (config.yaml + model/), a run folder or its "
                          "checkpoints/ folder")
    return found


def intact_checkpoint(path: Path, only: str = "", progress: bool = False, collective: bool = False) -> Path:
    """The checkpoint `path` names (checkpoint_folders) with its files (those under `only`)
    checked against its manifest: that one, or a run's newest intact one, saying which damaged
    ones it passed over; ConfigError when it is damaged or none is intact. A folder without a
    manifest (put together by hand) is taken as it is, with a note. `collective`: every rank
    calls it and checks a share of the files (verify_collective); rank 0 prints the notes."""
    folders = checkpoint_folders(path)
    speaks = not collective or torch.distributed.get_rank() == 0
    refused = RunRefused if collective else ConfigError  # a collective verdict is the same on every rank
    for ckpt in folders:
        if not (ckpt / MANIFEST).is_file() and len(folders) == 1:
            if speaks:
                print(f"note: {ckpt} has no {MANIFEST}: its files' checksums are not checked", file=sys.stderr)
            return ckpt
        if collective:
            damaged = verify_collective(ckpt, only=only)
        else:
            damaged = verify_checkpoint(ckpt, only=only, progress=progress)
        if not damaged:
            return ckpt
        if len(folders) == 1:
            raise refused(f"{ckpt} is damaged: {'; '.join(damaged[:3])} (`mm1 checkpoint verify` lists all)")
        if speaks:
            print(f"note: passing over {ckpt}, damaged: {'; '.join(damaged[:3])}", file=sys.stderr)
    raise refused(f"no intact checkpoint in {path} (`mm1 checkpoint verify {path}` lists what is damaged)")


def verify_collective(path: Path, only: str = "") -> list[str]:
    """Every rank checks its share of a checkpoint's files (those under `only`) against its
    manifest; returns the problems found by any rank, the same list on every rank. Collective."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        manifest = read_manifest(path)
        names = _shares({n: e["bytes"] for n, e in manifest.items() if n.startswith(only)}, world)[rank]
        mine = [p for p in (check_file(path, n, manifest[n]) for n in names) if p]
    except CheckpointDamaged as e:
        mine = e.problems if rank == 0 else []
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return sorted(p for part in everyone for p in part)
