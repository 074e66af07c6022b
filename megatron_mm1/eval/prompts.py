"""Few-shot prompts for model-based evaluation, built as MM1 evaluates: K interleaved (image,
text) examples drawn from the task file itself, never the query, then the query.

    caption          <image>{first reference}\\n ... <image>
    vqa              <image>Question: {question} Answer: {most common answer}\\n ... <image>Question: {question} Answer:
    multiple_choice  <image>Question: {question} Options: A) {choice} B) {choice} ... Answer: {letter}\\n ...

The model's continuation up to its first line break is the prediction.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from megatron_mm1.config import ConfigError
from megatron_mm1.eval.tasks import Record
from megatron_mm1.generate import IMAGE_MARKER


def shots(records: list[Record], query: int, k: int, seed: int) -> list[Record]:
    """K examples for item `query`: a draw that depends only on (seed, query), without it."""
    others = [i for i in range(len(records)) if i != query]
    if k > len(others):
        raise ConfigError(f"--shots {k} needs at least {k + 1} items in the task file; it has {len(records)}")
    return [records[i] for i in random.Random(f"{seed}:{query}").sample(others, k)]


def _example(kind: str, record: Record, answered: bool) -> str:
    f = record.fields
    if kind == "caption":
        return IMAGE_MARKER + (f"{f['references'][0]}\n" if answered else "")
    if kind == "vqa":
        answer = Counter(f["answers"]).most_common(1)[0][0]
        return f"{IMAGE_MARKER}Question: {f['question']} Answer:" + (f" {answer}\n" if answered else "")
    options = " ".join(f"{chr(65 + i)}) {choice}" for i, choice in enumerate(f["choices"]))
    text = f"{IMAGE_MARKER}Question: {f['question']} Options: {options} Answer:"
    return text + (f" {chr(65 + f['answer'])}\n" if answered else "")


def prompt(kind: str, records: list[Record], query: int, k: int, seed: int, images_root: Path) -> tuple[str, list[Path]]:
    """The prompt text and its image files (relative paths are under `images_root`, the task
    file's folder) for item `query` with `k` examples."""
    examples = [*shots(records, query, k, seed), records[query]]
    for r in examples:
        if kind != "caption" and not isinstance(r.fields.get("question"), str):
            raise ConfigError(f'item {r.id!r} (line {r.line}): "question" must be a string for model-based evaluation')
        if not isinstance(r.fields.get("image"), str):
            raise ConfigError(f'item {r.id!r} (line {r.line}): "image" must be a file path for model-based evaluation')
    text = "".join(_example(kind, r, answered=r is not records[query]) for r in examples)
    return text, [images_root / r.fields["image"] for r in examples]


def prediction(continuation: str) -> str:
    """The answer: the continuation up to its first line break."""
    return continuation.split("\n", 1)[0].strip()
