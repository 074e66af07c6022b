"""`mm1 data ...`: prepare, merge, verify, train-tokenizer, demo, bench.

Imports of the data modules (PIL, sentencepiece, torch) happen inside the commands so that
`mm1 --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_mm1.data.readers import FORMATS  # light: pyarrow and PIL are imported when reading

PREPARE_FORMATS = """formats (default keys in brackets):
  jsonl                 {"type": caption|interleaved|text|chat, ...} per line; --images required
  webdataset            img2dataset tar shards: KEY.jpg + KEY.txt -> caption
                        [--image-key jpg,jpeg,png,webp --text-key txt]
  llava                 LLaVA/ShareGPT4V JSON list or JSONL of {"image", "conversations"} -> chat;
                        --images required [--image-key image --conversations-key conversations]
  parquet-caption       an image column (bytes or {bytes, path}) and a text column -> caption
                        [--image-key image --text-key caption,text]
  parquet-interleaved   OBELICS: parallel lists, one null per position -> interleaved
                        [--image-key images --text-key texts]

examples:
  mm1 data prepare --input corpus.jsonl --images /data/images --out /data/prepared
  mm1 data prepare --format webdataset --input /data/cc12m-wds --out /data/cc12m
  mm1 data prepare --format llava --input blip_laion_cc_sbu_558k.json --images /data/llava/images --out /data/pretrain
  mm1 data prepare --format parquet-caption --input /data/hf/data --image-key image --text-key text --out /data/hf-prep

at scale (see docs/data.md, "Preparing at scale"): the output is the same whatever N and T are
  mm1 data prepare --format webdataset --input /data/laion --out /data/laion-prep --workers 16
  mm1 data prepare ... --num-tasks 16 --task-index I    # or from a Slurm array: SLURM_ARRAY_TASK_ID/COUNT
  mm1 data merge --data /data/laion-prep                # once all 16 tasks are done
an interrupted run continues where it stopped when run again with the same arguments
"""


def _fail(command: str, message: str) -> int:
    print(f"mm1 data {command}: {message}", file=sys.stderr)
    return 1


def _task(args: argparse.Namespace) -> tuple[int, int, str]:
    """(num_tasks, task_index, where they came from): the flags, else a Slurm job array's
    SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID, else one task."""
    from megatron_mm1.data.formats import DataError

    origins = []

    def pick(flag_value: int | None, flag: str, variable: str) -> int | None:
        if flag_value is not None:
            origins.append(flag)
            return flag_value
        if variable not in os.environ:
            return None
        origins.append(variable)
        try:
            return int(os.environ[variable])
        except ValueError:
            raise DataError(f"{variable}={os.environ[variable]!r} is not a number") from None

    num_tasks = pick(args.num_tasks, "--num-tasks", "SLURM_ARRAY_TASK_COUNT")
    task_index = pick(args.task_index, "--task-index", "SLURM_ARRAY_TASK_ID")
    if num_tasks is None and task_index is not None:
        raise DataError(f"{origins[0]} needs --num-tasks (or SLURM_ARRAY_TASK_COUNT)")
    if task_index is None and (num_tasks or 1) > 1:
        raise DataError(f"{num_tasks} tasks ({origins[0]}) need --task-index (or SLURM_ARRAY_TASK_ID)")
    return num_tasks or 1, task_index or 0, ", ".join(origins)


def _report(result, args: argparse.Namespace, head: str, tail: str = "") -> None:
    """The skipped records' examples (stderr), then the summary line "HEAD: counts TAIL", or with
    --json the counts as JSON."""
    for example in result.examples:
        print(f"skipped {example}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.summary()))
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped_by_reason.items()))
    print(f"{head}: {result.written} samples written, {result.skipped} skipped" + (f" ({reasons})" if reasons else "")
          + tail)


def _prepare(args: argparse.Namespace) -> int:
    from megatron_mm1.data.formats import DataError
    from megatron_mm1.data.prepare import prepare

    slurm_flags = [f"--{name.replace('_', '-')}" for name in SLURM_OPTIONS if getattr(args, name) not in (None, False)]
    if args.slurm is None and slurm_flags:
        return _fail("prepare", f"{', '.join(slurm_flags)} go with --slurm TASKS")
    if args.slurm is not None:
        return _submit_prepare(args)
    try:
        num_tasks, task_index, origin = _task(args)
        if num_tasks > 1:
            print(f"mm1 data prepare: task {task_index} of {num_tasks} (from {origin})", file=sys.stderr)
        result = prepare(args.input, args.images, args.out, samples_per_shard=args.samples_per_shard,
                         max_pixels=args.max_pixels, progress=not args.quiet, input_format=args.format,
                         text_key=args.text_key, image_key=args.image_key, conversations_key=args.conversations_key,
                         workers=1 if args.workers is None else args.workers, num_tasks=num_tasks, task_index=task_index,
                         unit_samples=args.unit_samples)
    except (DataError, OSError) as e:
        return _fail("prepare", str(e))
    resumed = f" ({result.resumed} committed by an earlier run)" if result.resumed else ""
    if result.already_prepared:
        _report(result, args, f"{args.out} already holds this preparation ({result.units} units), nothing to do")
    elif num_tasks > 1:
        _report(result, args, f"task {task_index} of {num_tasks}: {result.units} units{resumed}",
                f"; once all {num_tasks} tasks are done: mm1 data merge --data {args.out}")
    else:
        _report(result, args, f"prepared {args.out}: {result.units} units{resumed}")
    return 0


# The options of `mm1 data prepare --slurm` (besides --slurm itself).
SLURM_OPTIONS = ("cpus_per_task", "time", "partition", "account", "qos", "dry_run")


def _submit_prepare(args: argparse.Namespace) -> int:
    """--slurm T: check the input, render slurm/prepare.sbatch for T array tasks, and sbatch it
    (or print it with --dry-run)."""
    from megatron_mm1.config import ConfigError
    from megatron_mm1.data.formats import DataError
    from megatron_mm1.data.readers import open_source
    from megatron_mm1.slurm import PrepareJob, render_prepare, submit

    if args.slurm < 1:
        return _fail("prepare", f"--slurm {args.slurm}: give the number of array tasks, at least 1")
    given = [flag for flag, value in (("--num-tasks", args.num_tasks), ("--task-index", args.task_index),
                                      ("--workers", args.workers)) if value is not None]
    if given:
        return _fail("prepare", f"{', '.join(given)} are set by --slurm (the array's tasks; one worker per "
                                "CPU of --cpus-per-task)")
    inputs = [str(Path(p).resolve()) for p in args.input]
    if any(any(c.isspace() for c in p) for p in inputs):
        return _fail("prepare", "--slurm needs input paths without spaces")
    out = Path(args.out).resolve()
    try:
        open_source(args.format, inputs, args.images, args.text_key, args.image_key, args.conversations_key)
    except DataError as e:
        return _fail("prepare", str(e))
    extra = ["--samples-per-shard", str(args.samples_per_shard), "--unit-samples", str(args.unit_samples),
             "--max-pixels", str(args.max_pixels)]
    for flag, value in (("--text-key", args.text_key), ("--image-key", args.image_key),
                        ("--conversations-key", args.conversations_key)):
        if value is not None:
            extra += [flag, value]
    job = PrepareJob(args.slurm, out, {
        "FORMAT": args.format, "INPUT": inputs, "IMAGES": str(Path(args.images).resolve()) if args.images else "",
        "OUT": str(out), "NUM_TASKS": str(args.slurm), "EXTRA": extra,
    }, args.cpus_per_task, args.time, args.partition, args.account, args.qos)
    script = render_prepare(job)
    if args.dry_run:
        print(script, end="")
        return 0
    job.logs.mkdir(parents=True, exist_ok=True)
    path = job.logs / "prepare.sbatch"
    path.write_text(script)
    try:
        job_id = submit(path)
    except ConfigError as e:
        return _fail("prepare", str(e))
    print(f"submitted array job {job_id}: {args.slurm} tasks preparing {out}, then a merge job")
    print(f"  script: {path}")
    print(f"  logs:   {job.logs}/{job_id}_<task>.out; the merge's: {out}-merge-<id>.out")
    print(f"  follow: squeue -j {job_id}")
    print(job_id)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from megatron_mm1.data.formats import DataError
    from megatron_mm1.data.prepare import merge

    try:
        result = merge(args.data)
    except (DataError, OSError) as e:
        return _fail("merge", str(e))
    if result.already_prepared:
        _report(result, args, f"{args.data} is already merged ({result.units} units), nothing to do")
    else:
        _report(result, args, f"merged {result.units} units into {args.data}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megatron_mm1.data.formats import DataError, load_manifest, verify_checksums

    try:
        shards = sum(len(info["shards"]) for info in load_manifest(args.data)["kinds"].values())
        damaged = verify_checksums(args.data, progress=not args.quiet)
    except (DataError, OSError) as e:
        return _fail("verify", str(e))
    if args.json:
        print(json.dumps({"shards": shards, "damaged": damaged}))
    if damaged:
        return _fail("verify", f"{len(damaged)} of {shards} shards differ from the manifest's sha256: "
                     f"{', '.join(damaged)}; restore them from the original copy or re-run `mm1 data prepare`")
    if not args.json:
        print(f"{args.data}: all {shards} shards match the manifest's sha256")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from megatron_mm1.data.formats import DataError
    from megatron_mm1.data.tokenizer import train_tokenizer

    try:
        path = train_tokenizer(args.input, args.out, args.vocab_size, args.model_type,
                               byte_fallback=not args.no_byte_fallback)
    except DataError as e:
        return _fail("train-tokenizer", str(e))
    print(f"wrote {path} (unk=0 bos=1 eos=2 pad=3 <image>=4)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from megatron_mm1.data.demo import make_demo
    from megatron_mm1.data.formats import DataError

    try:
        result = make_demo(args.out, vocab_size=args.vocab_size, seed=args.seed, progress=True)
    except (DataError, OSError) as e:
        return _fail("demo", str(e))
    out = Path(args.out)
    print(f"demo corpus: {result.written} samples in {out}; tokenizer {out / 'tokenizer.model'}")
    print(f"train with: --set data.path={out} --set data.tokenizer={out / 'tokenizer.model'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from megatron_mm1.config import ConfigError, load_config
    from megatron_mm1.data.bench import bench

    tokenizer = args.tokenizer or str(Path(args.data) / "tokenizer.model")
    overrides = [f"data.path={args.data}", f"data.tokenizer={tokenizer}", *args.set]
    try:
        result = bench(load_config(args.config, overrides), args.workers, batches=args.batches)
    except (ConfigError, OSError) as e:  # DataError is a ConfigError
        return _fail("bench", str(e))
    print(json.dumps(result))
    return 0


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare, tokenise and benchmark training data",
                                 description="Data pipeline: JSONL -> tar shards -> packed micro-batches.")
    data.set_defaults(func=lambda args: data.print_help() or 2)  # `mm1 data` alone
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    p = sub.add_parser("prepare", help="validate a corpus (JSONL, webdataset, LLaVA, parquet), write tar shards",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert a corpus and its images into tar shards with a manifest.\n"
                                   "Bad records are skipped and counted by reason. See docs/data.md.",
                       epilog=PREPARE_FORMATS)
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="input format (default jsonl; see below)")
    p.add_argument("--input", required=True, nargs="+",
                   help="jsonl, llava: one file; webdataset, parquet-*: files or folders of *.tar / *.parquet")
    p.add_argument("--images", help="folder the records' image paths are relative to (jsonl and llava only)")
    p.add_argument("--text-key", help="the text's member extension (webdataset) or column (parquet); "
                                      "comma-separated alternatives, the first present is used")
    p.add_argument("--image-key", help="the image's member extension (webdataset), field (llava) or column "
                                       "(parquet); comma-separated alternatives, the first present is used")
    p.add_argument("--conversations-key", help="llava: the conversation list's field (default conversations)")
    p.add_argument("--out", required=True,
                   help="output folder: empty, or holding this same preparation (which then continues)")
    p.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="at most this many samples per tar shard (default 10000); each unit has its own shards")
    p.add_argument("--unit-samples", type=int, default=10_000,
                   help="lines (jsonl, llava JSONL), rows (parquet) or records (llava JSON list) per unit of work "
                        "(default 10000); a webdataset unit is one input file. Changes the shards, not the samples")
    p.add_argument("--workers", type=int,
                   help="processes preparing units on this machine (default 1); the output does not depend on it")
    p.add_argument("--num-tasks", type=int,
                   help="split the units among this many tasks, each run on its own (default "
                        "SLURM_ARRAY_TASK_COUNT, else 1); then `mm1 data merge`")
    p.add_argument("--task-index", type=int,
                   help="this task's index, 0..num-tasks-1 (default SLURM_ARRAY_TASK_ID)")
    p.add_argument("--max-pixels", type=int, default=100_000_000,
                   help="skip images larger than this many pixels, read from the header (default 1e8)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary {written, skipped, skipped_by_reason} as the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    slurm = p.add_argument_group("on Slurm", "submit the preparation as a job array (slurm/prepare.sbatch) "
                                 "instead of running it here; a merge job follows the tasks")
    slurm.add_argument("--slurm", type=int, metavar="TASKS", help="array tasks, each preparing its share of the units")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs of each task, one worker each (default: the script's, 64)")
    slurm.add_argument("--time", help="time limit of each task, e.g. 24:00:00 (a task cut short continues when re-run)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--account", help="Slurm account")
    slurm.add_argument("--qos", help="Slurm quality of service")
    slurm.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("merge", help="combine the parts of a --num-tasks preparation into its manifest",
                       description="Combine the part-manifests that the `mm1 data prepare --num-tasks T` tasks "
                                   "wrote into OUT/parts into OUT/manifest.json, the shards in the order one task "
                                   "would have written them. Refuses, naming them, parts that are missing, "
                                   "unfinished or made with other settings.")
    p.add_argument("--data", required=True, help="the --out folder of the tasks")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary {written, skipped, skipped_by_reason} as the last line")
    p.set_defaults(func=_merge)

    p = sub.add_parser("verify", help="check every shard of a prepared folder against the manifest's sha256",
                       description="Hash every shard of a prepared folder and compare with the sha256 its "
                                   "manifest recorded (after copying data to a cluster, say). Exit 1 and name "
                                   "the shards that differ.")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--json", action="store_true", help='print {"shards": N, "damaged": [names]} as the last line')
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_verify)

    p = sub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer with the model's special ids",
                       description="Train a SentencePiece model on text files (one document per line) with "
                                   "unk=0, bos=1, eos=2, pad=3 and the <image> piece at id 4.")
    p.add_argument("--input", required=True, nargs="+", help="plain-text training files")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", required=True, type=int, help="number of pieces, at most model.llm.vocab_size")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="default bpe")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="map unknown characters to <unk> instead of byte pieces (saves 256 ids)")
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser("demo", help="generate a small learnable multimodal corpus (no download)",
                       description="Draw shapes with PIL and write captions, interleaved documents and text "
                                   "about them; prepare them into shards in OUT and train OUT/tokenizer.model.")
    p.add_argument("--out", required=True, help="output folder (becomes the data folder)")
    p.add_argument("--vocab-size", type=int, default=256, help="tokenizer size (default 256)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="measure loader throughput",
                       description="Run the training loader on a prepared folder and print, as the last line, "
                                   "JSON with images_per_s, tokens_per_s and sequences_per_s.")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2)")
    p.add_argument("--batches", type=int, default=50, help="micro-batches to time (default 50)")
    p.add_argument("--config", default="tiny", help="preset or YAML giving sequence length, image size... (default tiny)")
    p.add_argument("--tokenizer", help="SentencePiece model (default DATA/tokenizer.model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.set_defaults(func=_bench)
