"""Packing rules, the per-row arrays, and a JSONL -> batches round trip."""

import json
import random

import numpy as np
import pytest
import torch

from megatron_mm1.config import load_config
from megatron_mm1.data.images import CLIP_MEAN, CLIP_STD
from megatron_mm1.data.loader import build_loader
from megatron_mm1.data.packing import Encoded, Packer, row_arrays
from megatron_mm1.data.prepare import prepare
from megatron_mm1.data.tokenizer import train_tokenizer

IMG, N = 4, 4  # <image> id and tokens per image, as in the tiny preset


def doc(layout: str, start_id: int = 10) -> Encoded:
    """'t5 i t3' -> bos, 5 text ids, an image block, 3 text ids, eos; text ids count up from start_id."""
    ids, pos, images, nxt = [1], [], [], start_id
    for part in layout.split():
        if part == "i":
            pos.append(len(ids))
            images.append(f"img{len(images)}")
            ids += [IMG] * N
        else:
            ids += list(range(nxt, nxt + int(part[1:])))
            nxt += int(part[1:])
    tokens = np.asarray(ids + [2], dtype=np.int64)
    return Encoded(tokens, pos, images, tokens != IMG)


def packer_over(samples: list[Encoded], seq_length=128, max_images=16) -> Packer:
    """A packer drawing `samples` in order, then a long text-only filler forever."""
    samples = samples + [doc("t1000", start_id=5000)]
    it = iter(range(len(samples) - 1))
    return Packer(lambda: next(it, len(samples) - 1), lambda ref: samples[ref], seq_length, max_images, N)


def test_samples_that_fit_are_never_split():
    p = packer_over([doc("t48"), doc("t48"), doc("t48"), doc("t10")])
    assert [len(c.tokens) for c in p.next_row()] == [50, 50]  # the third would not fit: row closed
    # ... and a sample longer than any row fills what is left.
    assert [len(c.tokens) for c in p.next_row()] == [50, 12, 66]


def test_long_document_is_split_without_cutting_images():
    # The first image straddles the 128-token boundary: the packer must move the cut.
    sample = doc("t124 i t100 i t20 i i t60")
    p = packer_over([sample], seq_length=128)
    rows = [p.next_row() for _ in range(3)]
    pieces = [c for r in rows for c in r][:3]  # then comes the filler
    assert np.array_equal(np.concatenate([c.tokens for c in pieces]), sample.tokens)
    cuts = np.cumsum([len(c.tokens) for c in pieces])[:-1]
    for cut in cuts:
        assert not any(pos < cut < pos + N for pos in sample.image_pos), cut
    assert [img for c in pieces for img in c.images] == sample.images
    assert all(sum(len(c.tokens) for c in r) <= 128 for r in rows)
    assert cuts.tolist() == [125, 253]  # 125: moved back from 128 to the start of the first image


def test_more_images_than_a_row_allows_are_spread_over_rows():
    sample = doc(" ".join(["t1 i"] * 40 + ["t1"]))  # 40 images, 201 tokens
    p = packer_over([sample], seq_length=128, max_images=16)
    rows = [p.next_row() for _ in range(3)]
    per_row = [sum(len(c.images) for c in r) for r in rows]
    assert per_row == [16, 16, 8]
    assert [img for r in rows for c in r for img in c.images] == sample.images


def test_row_arrays_follow_the_contract():
    a, b = doc("t2"), doc("i t1")  # [1, 10, 11, 2] and [1, 4, 4, 4, 4, 10, 2]
    p = packer_over([a, b, doc("t8")], seq_length=14)
    arrays = row_arrays(p.next_row(), 14, IMG)
    assert arrays["tokens"].tolist() == [1, 10, 11, 2, 1, 4, 4, 4, 4, 10, 2, 3, 3, 3]
    assert arrays["labels"].tolist() == [10, 11, 2, 3, 4, 4, 4, 4, 10, 2, 3, 3, 3, 3]
    assert arrays["loss_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert arrays["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0]
    assert arrays["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0]
    assert arrays["tokens"].dtype == np.int64 and arrays["loss_mask"].dtype == np.float32
    assert arrays["segment_ids"].dtype == np.int32


# ----------------------------------------------------------------------------- round trip

WORDS = "apple river stone cloud lamp tiger violet paper window garden".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Captions, interleaved documents and texts; every image a unique solid colour."""
    from PIL import Image

    root = tmp_path_factory.mktemp("roundtrip")
    (root / "images").mkdir()
    rng = random.Random(0)
    colours: dict[str, tuple[int, int, int]] = {}

    def image() -> str:
        k = len(colours)
        name = f"{k}.png"
        colours[name] = (20 + 5 * k, 250 - 5 * k, (60 * k) % 256)
        Image.new("RGB", (rng.randint(40, 90), rng.randint(40, 90)), colours[name]).save(root / "images" / name)
        return name

    def text(k: int) -> str:
        return f"item {k} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))

    records = []
    for k in range(15):
        records.append({"type": "caption", "image": image(), "text": text(k)})
    for k in range(15, 25):
        segments = []
        for _ in range(rng.randint(1, 3)):
            segments += [{"text": text(k)}, {"image": image()}]
        records.append({"type": "interleaved", "segments": segments + [{"text": text(k)}]})
    for k in range(25, 35):
        records.append({"type": "text", "text": text(k)})
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(root / "in.jsonl", root / "images", root / "data", samples_per_shard=4, progress=False)
    (root / "text.txt").write_text("\n".join(text(k) for k in range(200)) + "\n")
    train_tokenizer([root / "text.txt"], root / "tok", 100, byte_fallback=False)
    return root, records, colours


def as_pieces(record: dict, colours: dict) -> list:
    if record["type"] == "caption":
        return [("image", colours[record["image"]]), ("text", record["text"])]
    if record["type"] == "text":
        return [("text", record["text"])]
    return [("image", colours[s["image"]]) if "image" in s else ("text", s["text"]) for s in record["segments"]]


def test_round_trip_reproduces_text_and_image_order(corpus):
    root, records, colours = corpus
    cfg = load_config("tiny", [f"data.path={root / 'data'}", f"data.tokenizer={root / 'tok.model'}"])
    loader = build_loader(cfg, num_workers=0)
    tok = loader.tokenizer
    sizes = [len(d) for d in loader.datasets]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    seen = []
    for batch in loader:
        b, s = batch["tokens"].shape
        assert (b, s) == (2, 128) and batch["images"].shape[1:] == (3, 56, 56)
        assert batch["images"].shape[0] == int(batch["num_images"].sum())
        images = iter(batch["images"])
        for row in range(b):
            tokens, seg = batch["tokens"][row], batch["segment_ids"][row]
            # contract: labels / loss mask / positions against their definitions
            same_next = torch.cat([seg[1:] == seg[:-1], torch.tensor([False])]) & (seg > 0)
            expected_labels = torch.where(same_next, torch.roll(tokens, -1), torch.tensor(3))
            assert torch.equal(batch["labels"][row], expected_labels)
            assert torch.equal(batch["loss_mask"][row], (same_next & (expected_labels != IMG)).float())
            assert int((tokens == IMG).sum()) == N * int(batch["num_images"][row])
            for j in range(1, int(seg.max()) + 1):
                ids = tokens[seg == j].tolist()
                assert torch.equal(batch["position_ids"][row][seg == j], torch.arange(len(ids)))
                assert ids[0] == 1 and ids[-1] == 2  # every sample fits whole: bos ... eos
                pieces, k = [], 1
                while k < len(ids) - 1:
                    if ids[k] == IMG:
                        assert ids[k:k + N] == [IMG] * N
                        rgb = (next(images) * std + mean).mean(dim=(1, 2)) * 255
                        pieces.append(("image", tuple(int(round(float(c))) for c in rgb)))
                        k += N
                    else:
                        end = next((e for e in range(k, len(ids) - 1) if ids[e] == IMG), len(ids) - 1)
                        pieces.append(("text", tok.decode(ids[k:end])))
                        k = end
                seen.append(pieces)
        assert next(images, None) is None  # images consumed exactly, in order
        if all(c > n for c, n in zip(loader.state_dict()["mixture"]["cursors"], sizes)):
            break  # every dataset has begun a second epoch: all of epoch one has been placed

    expected = [as_pieces(r, colours) for r in records]
    for pieces in seen:
        assert pieces in expected, pieces
    assert all(e in seen for e in expected)
