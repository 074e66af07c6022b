"""`mm1 eval --score`: score predictions against captioning, VQA and multiple-choice tasks with
the MM1 paper's metrics (CIDEr, BLEU-4, VQA accuracy, accuracy); no model is loaded."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NO_MODEL_EVAL = ("model-based evaluation (--checkpoint) is not built yet: score a model's "
                 "predictions with --score --task KIND:FILE --predictions FILE")


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

    if not args.score:
        raise ConfigError(NO_MODEL_EVAL)
    if not args.task:
        raise ConfigError("--score needs at least one --task KIND:FILE")
    if len(args.predictions) != len(args.task):
        raise ConfigError(f"{len(args.task)} --task but {len(args.predictions)} --predictions: give one "
                          "--predictions FILE for each --task, in the same order")
    loaded = {}  # every file is read and checked before anything is scored
    for spec, predictions_file in zip(args.task, args.predictions):
        kind, path = parse_task(spec)
        if path.stem in loaded:
            raise ConfigError(f"two tasks named {path.stem!r}: give their files different names")
        records = load_task(kind, path)
        predictions = load_predictions(Path(predictions_file), records, path)
        loaded[path.stem] = (kind, path, predictions_file, records, predictions)
    results, scored = {}, []
    for name, (kind, path, predictions_file, records, predictions) in loaded.items():
        metrics, each = score(kind, records, predictions)
        results[name] = {"kind": kind, "task_file": str(path), "predictions_file": predictions_file,
                         "n": len(records), "metrics": metrics}
        scored += [{"task": name, "id": r.id, "prediction": p, "scores": s}
                   for r, p, s in zip(records, predictions, each)]
    report(results, scored, args.out, args.json)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score captioning, VQA and multiple-choice predictions (CIDEr, BLEU-4, VQA accuracy)",
        description="Score predictions with the MM1 paper's metrics: CIDEr-D and BLEU-4 as the "
        "COCO caption evaluation computes them (no Java needed), the official VQA accuracy, and "
        "multiple-choice accuracy. Task and prediction files are JSONL matched by id "
        "(docs/eval.md). Prints a table; --out also writes metrics.json and the scored "
        "predictions.jsonl.",
    )
    p.add_argument("--score", action="store_true",
                   help="score existing predictions (model-free; the only mode built so far)")
    p.add_argument("--task", action="append", default=[], metavar="KIND:FILE",
                   help="a task file, KIND one of caption, vqa, multiple_choice (repeatable)")
    p.add_argument("--predictions", action="append", default=[], metavar="FILE",
                   help="the predictions JSONL for each --task, in the same order (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/metrics.json and DIR/predictions.jsonl")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    p.set_defaults(func=run)
