"""mm1 eval's metrics (megatron_mm1/eval) and `mm1 eval --score`: VQA accuracy and answer
normalisation against hand-computed values, multiple-choice matching, CIDEr-D/BLEU-4 against
pycocoevalcap's scorers, the PTB tokeniser against pycocoevalcap's Java one, the CLI end to end."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from megatron_mm1.eval.metrics import (
    coco_caption_scores,
    multiple_choice_correct,
    ptb_tokenize,
    vqa_accuracy,
    vqa_normalize_prediction,
)

ROOT = Path(__file__).resolve().parent.parent

# ---- VQA ---------------------------------------------------------------------------------------


def test_vqa_accuracy_hand_computed():
    # 3 of 10 annotators answered "2"; "two" normalises to "2". Leaving out one of the 3 leaves
    # 2 matches (2/3), leaving out one of the other 7 leaves 3 (min(3/3, 1) = 1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["2", "2", "2", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    # One matching annotator: the 9 subsets holding it give 1/3, the other 0: 9/10 * 1/3 = 0.3.
    assert vqa_accuracy("3", ["3"] + ["4"] * 9) == pytest.approx(0.3)
    # 4 or more matches: every 9-subset holds 3 of them.
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("maybe", ["yes"] * 10) == 0.0
    # Any number of answers: red, red, blue -> (1/3 + 1/3 + 2/3) / 3.
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx(4 / 9)


def test_vqa_normalisation_as_the_official_script():
    assert vqa_normalize_prediction("Yes.") == "yes"
    assert vqa_normalize_prediction("the dog") == "dog"
    assert vqa_normalize_prediction("A dog and an apple") == "dog and apple"
    assert vqa_normalize_prediction("dont") == "don't"  # contractions get their apostrophe back
    assert vqa_normalize_prediction("don't") == "don't"
    assert vqa_normalize_prediction("Two") == "2"
    assert vqa_normalize_prediction("none") == "0"
    # A digit-group comma anywhere: every punctuation mark is deleted, not made a space.
    assert vqa_normalize_prediction("10,000") == "10000"
    assert vqa_normalize_prediction("yes/no") == "yes no"  # no space around it: a space
    assert vqa_normalize_prediction("red, white") == "red white"  # next to a space: deleted
    assert vqa_normalize_prediction("3.5") == "3.5"  # a period before a digit stays
    assert vqa_normalize_prediction("a.m.") == "am"
    assert vqa_normalize_prediction("  Tennis\n") == "tennis"


def test_vqa_annotator_answers_are_only_punctuation_processed_when_they_differ():
    # vqaEval leaves unanimous answers as they are (VQAv2's are normalised already) ...
    assert vqa_accuracy("yes", ["Yes."] * 10) == 0.0
    # ... and otherwise only strips their punctuation, without lower-casing.
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["Yes"] * 3 + ["no"] * 7) == 0.0


# ---- multiple choice ---------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, correct", [
    ("blue", True), ("  Blue ", True), ("B", True), ("b", True), ("B)", True), ("b.", True),
    ("B:", True), ("B) blue", True), ("b. the blue one", True), ("B: blue", True),
    ("(B)", False), ("B blue", False), ("Bl", False), ("A", False), ("red", False), ("", False),
    ("blue!", False), ("C) blue", False),
])
def test_multiple_choice_matching(prediction, correct):
    assert multiple_choice_correct(prediction, ["red", "blue", "green"], 1) is correct


# ---- CIDEr-D and BLEU-4 ------------------------------------------------------------------------


def test_caption_scores_are_pycocoevalcaps():
    references = [["a man riding a wave on top of a surfboard", "a surfer rides a big wave"],
                  ["two dogs play in the grass", "dogs playing on a green lawn", "a pair of dogs outside"],
                  ["a plate of food with broccoli", "broccoli and rice on a plate"]]
    candidates = ["a man rides a wave on a surfboard", "two dogs playing in the grass", "a plate of rice"]
    metrics, each = coco_caption_scores(candidates, references)
    gts = dict(enumerate(references))
    res = {i: [c] for i, c in enumerate(candidates)}
    cider, cider_each = Cider().compute_score(gts, res)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    assert metrics == {"CIDEr": pytest.approx(cider), "BLEU-4": pytest.approx(bleu[3])}
    assert [e["CIDEr"] for e in each] == pytest.approx(list(cider_each))
    assert [e["BLEU-4"] for e in each] == pytest.approx(bleu_each[3])
    assert 0 < metrics["BLEU-4"] < 1 and 0 < metrics["CIDEr"] < 10


def test_caption_scores_hand_computed():
    # Predictions equal to their references, and no n-gram shared between the two images: every
    # n-gram's idf is log(2 images) - log(1) and the tf-idf vectors are equal, so each n-gram
    # order's cosine is 1 and the length penalty exp(0) = 1: CIDEr-D = 10 * mean(1, 1, 1, 1) = 10.
    # BLEU-4: every n-gram matches and the lengths are equal: 1 (up to pycocoevalcap's 1e-9).
    references = [["a cat sat on the mat"] * 2, ["dogs run in green fields"] * 2]
    metrics, each = coco_caption_scores(["a cat sat on the mat", "dogs run in green fields"], references)
    assert metrics["CIDEr"] == pytest.approx(10.0)
    assert [e["CIDEr"] for e in each] == pytest.approx([10.0, 10.0])
    assert metrics["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    # A prediction sharing no word with its references scores 0 on both.
    metrics, each = coco_caption_scores(["a cat sat on the mat", "purple elephants fly by"], references)
    assert each[1]["CIDEr"] == 0.0 and each[1]["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["CIDEr"] == pytest.approx(5.0)


# ---- the PTB tokeniser -------------------------------------------------------------------------

# (caption, what pycocoevalcap's Java PTBTokenizer makes of it), checked with its jar.
TOKENISED = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("A man's dog, (grey) can't jump!", "a man 's dog -lrb- grey -rrb- ca n't jump"),
    ("The dogs' bowls are EMPTY; the cat's isn't.", "the dogs bowls are empty the cat 's is n't"),
    ('A "Stop" sign at the corner of Main St. and 5th Ave.', "a stop sign at the corner of main st. and 5th ave."),
    ("I cannot believe it's gonna rain at 3:30 p.m. in the U.S.",
     "i can not believe it 's gon na rain at 3:30 p.m. in the u.s."),
    ("A black/white photo of a 12-year-old in a T-shirt -- smiling...",
     "a black/white photo of a 12-year-old in a t-shirt smiling"),
    ("10,000 people (maybe more) at the #1 concert!!", "10,000 people -lrb- maybe more -rrb- at the # 1 concert !!"),
    ("Mr. Smith & Mrs. Jones eat fish and chips at No. 10.", "mr. smith & mrs. jones eat fish and chips at no. 10"),
    ("A sign that says No.", "a sign that says no"),
    ("What is this? It's a cat, I think.", "what is this it 's a cat i think"),
    ("rock'n'roll o'clock \u2018quoted\u2019 \u201cdouble\u201d don\u2019t", "rock 'n' roll o'clock quoted double do n't"),
    ("a [red] {blue} <green> sign", "a -lsb- red -rsb- -lcb- blue -rcb- <green> sign"),
    ("", ""),
]


def test_ptb_tokenize_typical_captions():
    captions, expected = zip(*TOKENISED)
    assert ptb_tokenize(list(captions)) == list(expected)


def test_ptb_tokenize_reads_captions_as_lines_of_one_text():
    # "z." then a capitalised sentence start, on the next line too, is "z" "." (as in Java).
    assert ptb_tokenize(["the letter z.", "The end"]) == ["the letter z", "the end"]
    assert ptb_tokenize(["the letter z.", "the end"]) == ["the letter z.", "the end"]
    assert ptb_tokenize(["one\ntwo", "three\u2028four"]) == ["one two", "three four"]
    assert ptb_tokenize([]) == []


def test_ptb_tokenize_agrees_with_pycocoevalcaps_java_tokenizer():
    """Random mixes of caption words and tricky tokens, tokenised by both (Java runs only here:
    `mm1 eval` does not need it; .ci/run installs it)."""
    if shutil.which("java") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("java is missing: CI installs default-jre-headless (.ci/run)")
        pytest.skip("needs Java to run pycocoevalcap's tokeniser")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    pieces = ["a", "A", "The", "man", "Man's", "dog", "dogs'", "grey", "cannot", "gonna", "St.", "Mr.",
              "No.", "No. 5", "U.S.", "p.m.", "e.g.", "don't", "it's", "o'clock", "12-year-old", "3.5",
              "10,000", "$5", "(", ")", "[", "{", '"', "'", "...", "--", "-", "!!", "?", ",", ";", ":",
              ".", "black/white", "amazon.com", "#tag", "@bob", "AT&T", "b&w", "<unk>", "\u00bd", "z.",
              "Jan.", "Inc.", "Mass.", "mass.", "\u2019s", "\u201cquote\u201d", ":)", "^_^", "caf\u00e9",
              "\U0001f600", "x\u00b2", "5 1/2", "C++", "'90s", "y'all", "file.jpg", "dog.The", "Ph.D."]
    rng = random.Random(0)
    captions = [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) + rng.choice(["", ".", " ."])
                for _ in range(1500)]
    java = PTBTokenizer().tokenize({0: [{"caption": c} for c in captions]})[0]
    ours = ptb_tokenize(captions)
    differ = [(c, o, j) for c, o, j in zip(captions, ours, java) if o != j]
    assert not differ, differ[:5]


# ---- mm1 eval --score, end to end --------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_scores_predictions_end_to_end(tmp_path):
    caption = _write(tmp_path / "coco.jsonl", [
        {"id": 1, "image": "1.jpg", "references": ["A cat sat on the mat.", "A cat on a mat."]},
        {"id": 2, "image": "2.jpg", "references": ["Dogs run in green fields.", "Two dogs running."]},
    ])
    caption_pred = _write(tmp_path / "coco_pred.jsonl", [
        {"id": 2, "prediction": "Dogs run in green fields."}, {"id": 1, "prediction": "A cat sat on the mat."},
    ])
    vqa = _write(tmp_path / "vqav2.jsonl", [
        {"id": "q1", "image": "1.jpg", "question": "How many?", "answers": ["2"] * 3 + ["3"] * 7},
        {"id": "q2", "image": "2.jpg", "question": "What color?", "answers": [{"answer": "red"}] * 10},
    ])
    vqa_pred = _write(tmp_path / "vqav2_pred.jsonl", [
        {"id": "q1", "prediction": "Two."}, {"id": "q2", "prediction": "red"},
    ])
    mc = _write(tmp_path / "mmbench.jsonl", [
        {"id": 7, "image": "1.jpg", "question": "?", "choices": ["red", "blue"], "answer": "blue"},
        {"id": 8, "image": "2.jpg", "question": "?", "choices": ["red", "blue"], "answer": 0},
    ])
    mc_pred = _write(tmp_path / "mmbench_pred.jsonl", [{"id": 7, "prediction": "B) blue"}, {"id": 8, "prediction": "B"}])
    missing = _write(tmp_path / "missing.jsonl", [{"id": "q1", "prediction": "2"}])
    malformed = _write(tmp_path / "malformed.jsonl", ['{"id": "q1", "prediction": "2"}', '{"id": "q2", "prediction": '])

    base = [sys.executable, "-m", "megatron_mm1.cli", "eval"]
    every_task = ["--score", "--task", f"caption:{caption}", "--predictions", str(caption_pred),
                  "--task", f"vqa:{vqa}", "--predictions", str(vqa_pred),
                  "--task", f"multiple_choice:{mc}", "--predictions", str(mc_pred)]
    runs = {  # started together: each pays the CLI's start-up (torch) once
        "table": [*base, *every_task, "--out", str(tmp_path / "out")],
        "json": [*base, *every_task, "--json"],
        "missing": [*base, "--score", "--task", f"vqa:{vqa}", "--predictions", str(missing)],
        "malformed": [*base, "--score", "--task", f"vqa:{vqa}", "--predictions", str(malformed)],
    }
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, cmd in runs.items()}
    out = {k: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for k, p in procs.items()}

    code, stdout, stderr = out["table"]
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["coco"]["kind"] == "caption" and metrics["coco"]["n"] == 2
    cider, _ = Cider().compute_score(  # on the captions as tokenised
        {0: ["a cat sat on the mat", "a cat on a mat"], 1: ["dogs run in green fields", "two dogs running"]},
        {0: ["a cat sat on the mat"], 1: ["dogs run in green fields"]})
    assert metrics["coco"]["metrics"]["CIDEr"] == pytest.approx(cider)
    assert metrics["vqav2"]["metrics"]["accuracy"] == pytest.approx(95.0)  # (90 + 100) / 2
    assert metrics["mmbench"]["metrics"]["accuracy"] == 50.0
    lines = stdout.splitlines()
    assert lines[0].split() == ["task", "kind", "n", "metric", "value"]
    assert ["vqav2", "vqa", "2", "accuracy", "95.00"] in [line.split() for line in lines]
    assert ["mmbench", "multiple_choice", "2", "accuracy", "50.00"] in [line.split() for line in lines]
    assert {line.split()[3] for line in lines[1:] if line.startswith("coco ")} == {"CIDEr", "BLEU-4"}
    scored = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(s["task"], s["id"]) for s in scored] == [("coco", 1), ("coco", 2), ("vqav2", "q1"), ("vqav2", "q2"),
                                                     ("mmbench", 7), ("mmbench", 8)]
    assert scored[2]["prediction"] == "Two." and scored[2]["scores"] == {"accuracy": pytest.approx(90.0)}
    assert [s["scores"]["accuracy"] for s in scored[4:]] == [100.0, 0.0]

    code, stdout, stderr = out["json"]
    assert code == 0, stderr
    assert json.loads(stdout) == metrics

    for name, expected in [("missing", f"{missing}: no prediction for id 'q2' ({vqa}:2)"),
                           ("malformed", f"{malformed}:2: not valid JSON")]:
        code, stdout, stderr = out[name]
        assert code == 2, (name, stderr)
        assert stderr.startswith(f"mm1 eval: {expected}"), (name, stderr)
        assert "Traceback" not in stderr


@pytest.mark.parametrize("argv, message", [
    ([], "give --checkpoint CKPT (the model answers) or --score with --predictions"),
    (["--score", "--checkpoint", "run"], "give --checkpoint CKPT (the model answers) or --score"),
    (["--score"], "give at least one --task KIND:FILE"),
    (["--checkpoint", "run", "--task", "vqa:a.jsonl", "--predictions", "p.jsonl"], "--predictions goes with --score"),
    (["--score", "--task", "vqa:a.jsonl"], "1 --task but 0 --predictions"),
    (["--score", "--task", "ocr:a.jsonl", "--predictions", "p.jsonl"], "--task ocr:a.jsonl: use KIND:FILE"),
    (["--score", "--task", "vqa:missing.jsonl", "--predictions", "p.jsonl"], "missing.jsonl: cannot read it"),
])
def test_cli_refuses_bad_arguments(argv, message, tmp_path, monkeypatch):
    from megatron_mm1.cli import build_parser
    from megatron_mm1.config import ConfigError

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["eval", *argv])
    with pytest.raises(ConfigError, match=re.escape(message)):
        args.func(args)


@pytest.mark.parametrize("task, problem", [
    ({"id": 1, "references": "a cat"}, '"references" must be a non-empty list of strings'),
    ({"id": 1, "references": []}, '"references" must be a non-empty list of strings'),
    ({"id": True, "references": ["a cat"]}, '"id" must be a string or an integer'),
    ({"id": 1, "answers": [{"answer": 2}]}, '"answers" must be a non-empty list'),
    ({"id": 1, "choices": ["a", "b"], "answer": 2}, '"answer" must be the index of a choice (0 to 1) or its text'),
    ({"id": 1, "choices": ["a", "b"], "answer": "c"}, '"answer" must be the index of a choice'),
    ({"id": 1, "choices": ["a"], "answer": 0}, '"choices" must be a list of 2 to 26 strings'),
])
def test_malformed_task_items_are_named_by_file_and_line(task, problem, tmp_path):
    from megatron_mm1.config import ConfigError
    from megatron_mm1.eval.tasks import load_task

    kind = "caption" if "references" in task else "vqa" if "answers" in task else "multiple_choice"
    path = _write(tmp_path / "task.jsonl", [{"id": 0, "references": ["x"], "answers": ["x"],
                                              "choices": ["x", "y"], "answer": 0}, task])
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2") + ".*" + re.escape(problem)):
        load_task(kind, path)


def test_predictions_must_match_the_task_ids(tmp_path):
    from megatron_mm1.config import ConfigError
    from megatron_mm1.eval.tasks import load_predictions, load_task

    task = _write(tmp_path / "t.jsonl", [{"id": 1, "references": ["a"]}, {"id": 2, "references": ["b"]}])
    records = load_task("caption", task)
    for rows, message in [
        ([{"id": 1, "prediction": "a"}, {"id": 3, "prediction": "c"}], f"p.jsonl:2: id 3 is not in {task}"),
        ([{"id": 1, "prediction": "a"}, {"id": 1, "prediction": "b"}],
         "p.jsonl:2: a second prediction for id 1 (first on line 1)"),
        ([{"id": 1, "prediction": 5}], 'p.jsonl:1 (id 1): "prediction" must be a string'),
        ([{"id": "1", "prediction": "a"}], f"p.jsonl:1: id '1' is not in {task}"),
        (["[1, 2]"], "p.jsonl:1: expected a JSON object, got list"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_predictions(_write(tmp_path / "p.jsonl", rows), records, task)
    assert load_predictions(_write(tmp_path / "p.jsonl", [{"id": 2, "prediction": "b"}, {"id": 1, "prediction": "a"}]),
                            records, task) == ["a", "b"]
    with pytest.raises(ConfigError, match=re.escape(f"{task}:2: duplicate id 1 (first on line 1)")):
        load_task("caption", _write(task, [{"id": 1, "references": ["a"]}, {"id": 1, "references": ["b"]}]))


def test_few_shot_prompts_draw_examples_from_the_task_without_the_query(tmp_path):
    from megatron_mm1.config import ConfigError
    from megatron_mm1.eval.prompts import prediction, prompt
    from megatron_mm1.eval.tasks import load_task

    items = [{"id": i, "image": f"{i}.png", "question": f"q{i}?", "answers": ["yes"] * 7 + ["no"] * 3,
              "choices": ["red", "blue"], "answer": i % 2} for i in range(5)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    vqa = load_task("vqa", path)
    text, images = prompt("vqa", vqa, 2, 2, seed=0, images_root=tmp_path)
    assert text.count("<image>") == 3 and len(images) == 3
    assert images[-1] == tmp_path / "2.png" and tmp_path / "2.png" not in images[:2]  # the query is last, once
    assert text.endswith("<image>Question: q2? Answer:") and text.count(" Answer: yes\n") == 2
    assert prompt("vqa", vqa, 2, 2, seed=0, images_root=tmp_path) == (text, images)  # the same draw every time
    assert any(prompt("vqa", vqa, 2, 2, seed=s, images_root=tmp_path)[1] != images for s in range(1, 6))
    mc = load_task("multiple_choice", path)
    text, _ = prompt("multiple_choice", mc, 0, 1, seed=0, images_root=tmp_path)
    assert "Options: A) red B) blue Answer: " in text and text.endswith("Options: A) red B) blue Answer:")
    assert prediction(" B) blue\nQuestion: ...") == "B) blue"
    with pytest.raises(ConfigError, match="--shots 5 needs at least 6 items"):
        prompt("vqa", vqa, 0, 5, seed=0, images_root=tmp_path)
