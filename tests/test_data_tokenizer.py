"""SentencePiece training and the id contract with the model."""

import random

import pytest
import sentencepiece as spm

from megatron_mm1.config import load_config
from megatron_mm1.data.formats import DataError
from megatron_mm1.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

WORDS = "red green blue circle square triangle left right top bottom one two three picture shows".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    # Made-up words give unigram training enough distinct pieces for a 64-piece vocabulary.
    words = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
                     for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000)) + "\n")
    return path


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_tokenizer_keeps_the_id_contract(corpus, tmp_path, model_type):
    path = train_tokenizer([corpus], tmp_path / "tok", 64, model_type, byte_fallback=False)
    tok = Tokenizer(path, image_token_id=4, max_vocab_size=1024)
    assert (tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id(), tok.sp.pad_id()) == (0, 1, 2, 3)
    assert tok.sp.piece_to_id("<image>") == 4
    assert tok.vocab_size == 64
    text = "two red circles on the left"
    assert tok.decode(tok.encode(text)) == text
    # Literal "<image>" in text is spelled out, never turned into an image position.
    assert 4 not in tok.encode("a picture <image> of nothing")


def test_byte_fallback_round_trips_unseen_characters(corpus, tmp_path):
    tok = Tokenizer(train_tokenizer([corpus], tmp_path / "tok", 320, "bpe"), 4)
    text = "Zürich 東京 ☃ red"
    assert tok.decode(tok.encode(text)) == text
    assert 0 not in tok.encode(text)  # no <unk>


def test_image_id_mismatch_is_a_clear_error(corpus, tmp_path):
    path = train_tokenizer([corpus], tmp_path / "tok", 64, byte_fallback=False)
    cfg = load_config("tiny", [f"data.tokenizer={path}", "model.image_token_id=5"])
    with pytest.raises(DataError, match=r"'<image>' piece has id 4 but model.image_token_id=5"):
        load_tokenizer(cfg)
    with pytest.raises(DataError, match="model.llm.vocab_size=32"):
        Tokenizer(path, 4, max_vocab_size=32)


def test_foreign_tokenizer_rejected(corpus, tmp_path):
    # SentencePiece's defaults: unk=0, bos=1, eos=2, no pad, no <image>.
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=64,
                                   minloglevel=2)
    with pytest.raises(DataError, match="special ids"):
        Tokenizer(tmp_path / "plain.model", 4)
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model", 4)
    with pytest.raises(DataError, match="data.tokenizer is not set"):
        load_tokenizer(load_config("tiny"))


def test_training_errors_are_clear(corpus, tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "tok", 64)
    with pytest.raises(DataError, match="SentencePiece training failed"):
        train_tokenizer([corpus], tmp_path / "tok", 100_000, "unigram")
