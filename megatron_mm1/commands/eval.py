"""`mm1 eval`: captioning, VQA and multiple-choice tasks scored with the MM1 paper's metrics
(CIDEr, BLEU-4, VQA accuracy, accuracy), on a checkpoint's few-shot answers (--checkpoint) or
on given predictions (--score, no model)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_mm1.commands.generate import add_layout_arguments


def parse_task(spec: str) -> tuple[str, Path]:
    """`vqa:data/vqav2_val.jsonl` -> ("vqa", Path("data/vqav2_val.jsonl"))."""
    from megatron_mm1.config import ConfigError
    from megatron_mm1.eval.tasks import KINDS

    kind, _, path = spec.partition(":")
    if kind not in KINDS or not path:
        raise ConfigError(f"--task {spec}: use KIND:FILE, KIND one of {', '.join(KINDS)}")
    return kind, Path(path)


def table(results: dict) -> str:
    """One row for each metric of each task."""
    rows = [("task", "kind", "n", "metric", "value")]
    for name, r in results.items():
        for metric, value in r["metrics"].items():
            rows.append((name, r["kind"], str(r["n"]), metric, f"{value:.2f}" if metric == "accuracy" else f"{value:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def report(results: dict, scored: list[dict], out: str | None, as_json: bool) -> None:
    """Print the table (or the metrics JSON) and write DIR/metrics.json and DIR/predictions.jsonl.
    Shared with model-based evaluation, which makes its predictions in memory."""
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
        with open(folder / "predictions.jsonl", "w", encoding="utf-8") as f:
            for item in scored:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        print(f"wrote {folder / 'metrics.json'} and {folder / 'predictions.jsonl'}", file=sys.stderr)
    print(json.dumps(results, indent=1) if as_json else table(results))


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.config import ConfigError
    from megatron_mm1.eval.tasks import load_predictions, load_task, score

    if args.score == bool(args.checkpoint):
        raise ConfigError("give --checkpoint CKPT (the model answers) or --score with --predictions (given answers)")
    if not args.task:
        raise ConfigError("give at least one --task KIND:FILE")
    if args.score and len(args.predictions) != len(args.task):
        raise ConfigError(f"{len(args.task)} --task but {len(args.predictions)} --predictions: give one "
                          "--predictions FILE for each --task, in the same order")
    if args.checkpoint and args.predictions:
        raise ConfigError("--predictions goes with --score; with --checkpoint the model makes them")
    loaded = {}  # every file is read and checked before anything is scored
    for i, spec in enumerate(args.task):
        kind, path = parse_task(spec)
        if path.stem in loaded:
            raise ConfigError(f"two tasks named {path.stem!r}: give their files different names")
        records = load_task(kind, path)
        predictions = load_predictions(Path(args.predictions[i]), records, path) if args.score else None
        source = {"predictions_file": args.predictions[i]} if args.score else {}
        loaded[path.stem] = (kind, path, records, predictions, source)
    if args.checkpoint:
        from megatron_mm1.config import parse_layout
        from megatron_mm1.generate import Generator, dry_run, run_elsewhere
        from megatron_mm1.runtime import shutdown

        prompts = _prompts(args, loaded)  # every prompt builds before a process starts or the model loads
        layout = parse_layout(args.set)
        if args.dry_run:
            tasks = {name: len(records) for name, (_, _, records, *_) in loaded.items()}
            print(json.dumps({**dry_run(args.checkpoint, layout, args.nproc), "tasks": tasks}, indent=1))
            return 0
        code = run_elsewhere(args.checkpoint, layout, args.nproc, args.argv)
        if code is not None:
            return code
        generator = Generator(args.checkpoint, args.tokenizer, layout, args.batch_size)
        loaded = _answer(generator, args, loaded, prompts)
        shutdown()
        if generator.env.rank != 0:
            return 0  # rank 0 reports
    results, scored = {}, []
    for name, (kind, path, records, predictions, source) in loaded.items():
        metrics, each = score(kind, records, predictions)
        results[name] = {"kind": kind, "task_file": str(path), **source, "n": len(records), "metrics": metrics}
        scored += [{"task": name, "id": r.id, "prediction": p, "scores": s}
                   for r, p, s in zip(records, predictions, each)]
    report(results, scored, args.out, args.json)
    return 0


def _prompts(args: argparse.Namespace, loaded: dict) -> dict[str, list]:
    """Each task's few-shot prompts (megatron_mm1/eval/prompts.py): (text, image files)."""
    from megatron_mm1.config import ConfigError
    from megatron_mm1.eval.prompts import prompt
    from megatron_mm1.generate import Sampling

    Sampling(args.max_new_tokens).check()
    if args.shots < 0:
        raise ConfigError(f"--shots {args.shots} must be >= 0")
    return {name: [prompt(kind, records, i, args.shots, args.seed, path.parent) for i in range(len(records))]
            for name, (kind, path, records, *_) in loaded.items()}


def _answer(generator, args: argparse.Namespace, loaded: dict, prompts: dict[str, list]) -> dict:
    """The model's greedy answer to every prompt, cut at its first line break; the items are
    spread over the data-parallel replicas and batched (megatron_mm1/generate.py)."""
    from megatron_mm1.eval.prompts import prediction
    from megatron_mm1.generate import Sampling

    source = {"checkpoint": str(generator.path), "shots": args.shots, "seed": args.seed}
    answered = {}
    for name, (kind, path, records, *_) in loaded.items():
        if generator.env.rank == 0:
            print(f"{name}: {len(records)} items", file=sys.stderr)
        results = generator.generate(prompts[name], Sampling(args.max_new_tokens), progress=sys.stderr.isatty())
        answered[name] = (kind, path, records, [prediction(r["text"]) for r in results], source)
    return answered


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="captioning, VQA and multiple-choice scores (CIDEr, BLEU-4, VQA accuracy) of a checkpoint or of predictions",
        description="Evaluate with the MM1 paper's metrics: CIDEr-D and BLEU-4 as the COCO caption "
        "evaluation computes them (no Java needed), the official VQA accuracy, and multiple-choice "
        "accuracy. --checkpoint: the model answers each item of the task files after --shots examples "
        "from the same file (greedy; the items spread over the data-parallel replicas of --nproc "
        "processes). --score: given predictions are scored, no model. "
        "Task and prediction files are JSONL matched by id (docs/eval.md). Prints a table; --out also "
        "writes metrics.json and the scored predictions.jsonl.",
    )
    p.add_argument("--checkpoint", help="the model answers: a checkpoint folder, or a run folder or its "
                   "checkpoints/ folder (the newest intact checkpoint), loaded at the layout of --nproc/--set")
    p.add_argument("--shots", type=int, default=0, help="with --checkpoint: examples before each question, "
                   "drawn from the task file without the question (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="with --checkpoint: longest answer in tokens (default 20)")
    p.add_argument("--seed", type=int, default=0, help="with --checkpoint: seed of the examples' draw (default 0)")
    p.add_argument("--tokenizer", help="with --checkpoint: SentencePiece model (default: the checkpoint's data.tokenizer)")
    p.add_argument("--batch-size", type=int, default=8, help="with --checkpoint: items answered at once by each "
                   "data-parallel replica (default 8)")
    p.add_argument("--score", action="store_true", help="score given predictions (--predictions), no model")
    p.add_argument("--task", action="append", default=[], metavar="KIND:FILE",
                   help="a task file, KIND one of caption, vqa, multiple_choice (repeatable)")
    p.add_argument("--predictions", action="append", default=[], metavar="FILE",
                   help="the predictions JSONL for each --task, in the same order (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/metrics.json and DIR/predictions.jsonl")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    add_layout_arguments(p)
    p.set_defaults(func=run)
