"""A photo-sized benchmark corpus for `mm1 data bench`: 640x480 JPEGs (smooth colour fields
with noise, so decoding costs what a photo costs), captions of about 40 words and interleaved
documents of about 300 words per image. No download.

  python tools/make_photo_corpus.py --out runs/photo --samples 600
  mm1 data bench --data runs/photo --config mm1-3b --workers 1
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_mm1.data.prepare import prepare
from megatron_mm1.data.tokenizer import train_tokenizer

WORDS = ("the a photo of red green blue small large dog cat tree river city street house car "
         "sky cloud person people sitting standing near under over beside with on in at and "
         "morning evening light shadow window door table book flower field mountain road").split()


def photo(rng: np.random.Generator, path: Path) -> None:
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    base = rng.uniform(0, 255, 3) + np.stack([x / 640 * rng.uniform(-80, 80), y / 480 * rng.uniform(-80, 80), (x + y) / 1120 * 60], -1)
    pixels = np.clip(base + rng.normal(0, 18, (480, 640, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def words(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n)) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=600)
    args = ap.parse_args()
    raw = args.out / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    rng, rnd = np.random.default_rng(0), random.Random(0)
    images = [f"{i:05d}.jpg" for i in range(64)]
    for name in images:
        photo(rng, raw / "images" / name)
    with open(raw / "corpus.jsonl", "w") as f:
        for i in range(args.samples):
            if i % 2:
                record = {"type": "caption", "image": rnd.choice(images), "text": words(rnd, 40)}
            else:
                segments = []
                for _ in range(rnd.randint(1, 4)):
                    segments += [{"image": rnd.choice(images)}, {"text": words(rnd, 300)}]
                record = {"type": "interleaved", "segments": segments}
            f.write(json.dumps(record) + "\n")
    (raw / "text.txt").write_text("\n".join(words(rnd, 50) for _ in range(2000)))
    prepare(raw / "corpus.jsonl", raw / "images", args.out, samples_per_shard=200, progress=True)
    train_tokenizer([raw / "text.txt"], args.out / "tokenizer", 256, byte_fallback=False)


if __name__ == "__main__":
    main()
