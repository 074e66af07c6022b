"""Task files and prediction files for `mm1 eval`, and scoring predictions against a task.

A task file is JSONL, one item a line, of one of three kinds (docs/eval.md):
  caption          {"id": ..., "image": "...", "references": ["...", ...]}
  vqa              {"id": ..., "image": "...", "question": "...", "answers": ["...", ...]}
  multiple_choice  {"id": ..., "image": "...", "question": "...", "choices": [...], "answer": 1}
A predictions file is JSONL too: {"id": ..., "prediction": "..."}, one for each task item.
Every problem is a ConfigError naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from megatron_mm1.config import ConfigError
from megatron_mm1.eval import metrics

KINDS = ("caption", "vqa", "multiple_choice")

Id = Union[str, int]


@dataclass
class Record:
    """One task item: its id, its line in the task file, and its fields, the target normalised
    (VQA answers as strings, a multiple-choice answer as the index of its choice)."""

    id: Id
    line: int
    fields: dict


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it: {e}") from None
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is JSON text
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _id(path: Path, number: int, obj: dict) -> Id:
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ConfigError(f'{path}:{number}: "id" must be a string or an integer, got {rid!r}')
    return rid


def _strings(value: object) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def _normalise(kind: str, obj: dict) -> tuple[Optional[str], dict]:
    """(what is wrong with the item or None, its fields with the target normalised)."""
    if kind == "caption":
        if not _strings(obj.get("references")):
            return '"references" must be a non-empty list of strings', obj
        return None, obj
    if kind == "vqa":
        answers = obj.get("answers")
        if isinstance(answers, list) and all(isinstance(a, dict) for a in answers):
            answers = [a.get("answer") for a in answers]  # VQAv2's [{"answer": ...}, ...]
        if not _strings(answers):
            return '"answers" must be a non-empty list of strings (or of {"answer": string})', obj
        return None, {**obj, "answers": answers}
    choices, answer = obj.get("choices"), obj.get("answer")
    if not _strings(choices) or not 2 <= len(choices) <= 26:
        return '"choices" must be a list of 2 to 26 strings', obj
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f'"answer" must be the index of a choice (0 to {len(choices) - 1}) or its text', obj
    return None, {**obj, "answer": answer}


def load_task(kind: str, path: Path) -> list[Record]:
    """The items of a task file, checked."""
    if kind not in KINDS:
        raise ConfigError(f"unknown task kind {kind!r}: use one of {', '.join(KINDS)}")
    records: list[Record] = []
    first_line: dict[Id, int] = {}
    for number, obj in read_jsonl(path):
        rid = _id(path, number, obj)
        if rid in first_line:
            raise ConfigError(f"{path}:{number}: duplicate id {rid!r} (first on line {first_line[rid]})")
        first_line[rid] = number
        problem, fields = _normalise(kind, obj)
        if problem:
            raise ConfigError(f"{path}:{number} (id {rid!r}): {problem}")
        records.append(Record(rid, number, fields))
    if not records:
        raise ConfigError(f"{path}: no items")
    return records


def load_predictions(path: Path, records: list[Record], task_path: Path) -> list[str]:
    """The prediction for each task item, in the items' order: exactly one for each."""
    wanted = {r.id for r in records}
    found: dict[Id, tuple[int, str]] = {}
    for number, obj in read_jsonl(path):
        rid = _id(path, number, obj)
        prediction = obj.get("prediction")
        if not isinstance(prediction, str):
            raise ConfigError(f'{path}:{number} (id {rid!r}): "prediction" must be a string')
        if rid not in wanted:
            raise ConfigError(f"{path}:{number}: id {rid!r} is not in {task_path}")
        if rid in found:
            raise ConfigError(f"{path}:{number}: a second prediction for id {rid!r} (first on line {found[rid][0]})")
        found[rid] = (number, prediction)
    missing = [r for r in records if r.id not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"{path}: no prediction for id {missing[0].id!r} ({task_path}:{missing[0].line}){more}")
    return [found[r.id][1] for r in records]


def score(kind: str, records: list[Record], predictions: list[str]) -> tuple[dict, list[dict]]:
    """(the task's metrics, each item's scores) for predictions in the records' order.

    caption: CIDEr and BLEU-4 on pycocoevalcap's scale (CIDEr 1.0 is the 100 of papers' tables);
    vqa: VQA accuracy in percent; multiple_choice: accuracy in percent.
    """
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} items")
    if kind == "caption":
        # One batch for the references and one for the predictions, as pycocoevalcap tokenises.
        references = [r.fields["references"] for r in records]
        flat = iter(metrics.ptb_tokenize([ref for refs in references for ref in refs]))
        tokenised = [[next(flat) for _ in refs] for refs in references]
        if not any(ref for refs in tokenised for ref in refs):
            raise ConfigError("every reference caption is empty once tokenised: CIDEr needs words")
        return metrics.coco_caption_scores(metrics.ptb_tokenize(predictions), tokenised)
    if kind == "vqa":
        each = [100 * metrics.vqa_accuracy(p, r.fields["answers"]) for r, p in zip(records, predictions)]
    elif kind == "multiple_choice":
        each = [100.0 * metrics.multiple_choice_correct(p, r.fields["choices"], r.fields["answer"])
                for r, p in zip(records, predictions)]
    else:
        raise ConfigError(f"unknown task kind {kind!r}: use one of {', '.join(KINDS)}")
    return {"accuracy": sum(each) / len(each)}, [{"accuracy": a} for a in each]
