"""SentencePiece tokenizer with the ids the model relies on: unk=0, bos=1, eos=2, pad=3, <image>=4.

`<image>` is trained as a *control* symbol: it owns an id but text is never split into it, so a
document that literally contains "<image>" cannot smuggle in a fake image position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm

from megatron_mm1.data.formats import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
IMAGE_PIECE = "<image>"


def train_tokenizer(
    inputs: Iterable[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
) -> Path:
    """Train a SentencePiece model on plain-text files (one sentence or document per line).

    Returns the path of the written `.model` file.
    """
    files = [str(p) for p in inputs]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"tokenizer training input not found: {', '.join(missing)}")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer model type '{model_type}' is unknown; use bpe or unigram")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=files,
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            control_symbols=[IMAGE_PIECE],  # first free id after the four specials: 4
            byte_fallback=byte_fallback,
            character_coverage=1.0 if byte_fallback else 0.9995,
            # Identity normalisation keeps decode(encode(text)) == text (up to extra spaces).
            normalization_rule_name="identity",
            input_sentence_size=10_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}") from None
    return Path(f"{model_prefix}.model")


class Tokenizer:
    """A loaded SentencePiece model, checked against the model's id contract."""

    def __init__(self, model_file: str | Path, image_token_id: int = 4, max_vocab_size: Optional[int] = None):
        path = Path(model_file)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; set data.tokenizer or train one with "
                            "`mm1 data train-tokenizer`")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{path} is not a SentencePiece model ({e})") from None
        self.path = path
        got = {"unk": self.sp.unk_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
        want = {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID}
        if got != want:
            raise DataError(f"tokenizer {path} has special ids {got}; the model needs {want}. "
                            "Retrain it with `mm1 data train-tokenizer`")
        image_id = self.sp.piece_to_id(IMAGE_PIECE)
        if self.sp.id_to_piece(image_id) != IMAGE_PIECE or image_id != image_token_id:
            found = image_id if self.sp.id_to_piece(image_id) == IMAGE_PIECE else "none"
            raise DataError(f"tokenizer {path}: the '{IMAGE_PIECE}' piece has id {found} but "
                            f"model.image_token_id={image_token_id}; set model.image_token_id to match "
                            "or retrain the tokenizer with `mm1 data train-tokenizer`")
        if max_vocab_size is not None and self.sp.vocab_size() > max_vocab_size:
            raise DataError(f"tokenizer {path} has {self.sp.vocab_size()} pieces, more than "
                            f"model.llm.vocab_size={max_vocab_size}; raise the vocabulary or retrain smaller")
        self.image_token_id = image_token_id

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        # A user-supplied model may declare <image> as user-defined (matched inside text); drop
        # such matches so image positions only ever come from real images.
        return [i for i in ids if i != self.image_token_id]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(cfg) -> Tokenizer:
    """The tokenizer named by cfg.data.tokenizer, checked against cfg.model."""
    if not cfg.data.tokenizer:
        raise DataError("data.tokenizer is not set; point it at a SentencePiece .model file")
    return Tokenizer(cfg.data.tokenizer, cfg.model.image_token_id, cfg.model.llm.vocab_size)
