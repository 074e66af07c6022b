"""`mm1 data demo | train-tokenizer | bench` end to end, through the argparse front end."""

import argparse
import json
import time

import numpy as np
import pytest
from PIL import Image

from megatron_mm1.data.cli import add_parser
from megatron_mm1.data.demo import COLOURS
from megatron_mm1.data.formats import load_manifest
from megatron_mm1.data.tokenizer import Tokenizer


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mm1")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    start = time.perf_counter()
    assert run_cli(["data", "demo", "--out", str(out)]) == 0
    assert time.perf_counter() - start < 30  # "well under a minute on 2 cores"
    return out


def test_demo_writes_all_three_kinds_and_a_fitting_tokenizer(demo):
    manifest = load_manifest(demo)
    assert set(manifest["kinds"]) == {"interleaved", "caption", "text"}
    assert manifest["skipped"] == 0 and manifest["kinds"]["caption"]["images"] > 0
    tok = Tokenizer(demo / "tokenizer.model", image_token_id=4, max_vocab_size=1024)  # the tiny preset's
    # Whole words: the corpus's vocabulary is small enough to be learnt as single pieces.
    assert len(tok.encode("two red circles on the left")) == 6
    # Captions describe their pictures: the caption's words name the drawn colour.
    first = next(json.loads(line) for line in (demo / "raw" / "demo.jsonl").open() if '"caption"' in line)
    pixels = {tuple(p) for p in np.asarray(Image.open(demo / "raw" / "images" / first["image"])).reshape(-1, 3)}
    colour = first["text"].split()[1]
    assert COLOURS[colour] in pixels


@pytest.mark.parametrize("workers", [0, 2])
def test_bench_prints_positive_figures_as_json(demo, capsys, workers):
    assert run_cli(["data", "bench", "--data", str(demo), "--workers", str(workers), "--batches", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("images_per_s", "tokens_per_s", "sequences_per_s"):
        assert result[key] > 0, key
    assert result["workers"] == workers


def test_train_tokenizer_command(demo, tmp_path, capsys):
    prefix = tmp_path / "tok"
    assert run_cli(["data", "train-tokenizer", "--input", str(demo / "raw" / "text.txt"), "--out", str(prefix),
                    "--vocab-size", "300", "--model-type", "bpe"]) == 0
    assert Tokenizer(f"{prefix}.model", 4).vocab_size == 300
    assert run_cli(["data", "train-tokenizer", "--input", str(tmp_path / "none.txt"), "--out", str(prefix),
                    "--vocab-size", "64"]) == 1
    assert "not found" in capsys.readouterr().err


def test_bench_errors_are_messages(tmp_path, capsys):
    assert run_cli(["data", "bench", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not a prepared data folder" in err and "Traceback" not in err
    assert run_cli(["data", "bench", "--data", str(tmp_path), "--set", "data.bogus=1"]) == 1
    assert "unknown field" in capsys.readouterr().err
