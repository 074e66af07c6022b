"""`mm1 data demo`: a small, learnable multimodal corpus drawn with PIL, no download.

Each image shows 1-3 shapes of one colour in one part of the picture, and its caption says
exactly that ("two red circles on the left"), so a tiny model can learn to ground colour, count,
shape and position. Interleaved documents chain several such pictures with sentences about
them and a total count; text documents state counting and shape facts.

Layout of OUT: raw/demo.jsonl + raw/images/*.png (the input), the prepared shards and
manifest.json (OUT is the data folder), and tokenizer.model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from megatron_mm1.data.prepare import PrepareResult, prepare
from megatron_mm1.data.tokenizer import train_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve")
CORNERS = {"circle": "no", "square": "four", "triangle": "three"}
IMAGE_SIZE = 64


def draw_scene(colour: str, shape: str, count: int, position: str, rng: random.Random) -> Image.Image:
    """`count` shapes in the named half of a light-grey picture, spread along that half."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (235, 235, 235))
    pen = ImageDraw.Draw(img)
    half, r = IMAGE_SIZE // 2, 6
    for k in range(count):
        along = (2 * k + 1) * IMAGE_SIZE // (2 * count)  # evenly spaced slots
        across = half // 2 + rng.randint(-3, 3)
        x, y = {"left": (across, along), "right": (half + across, along),
                "top": (along, across), "bottom": (along, half + across)}[position]
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            pen.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            pen.rectangle(box, fill=COLOURS[colour])
        else:
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    return img


def describe_scene(colour: str, shape: str, count: int, position: str) -> str:
    where = "on the" if position in ("left", "right") else "at the"
    return f"{NUMBERS[count]} {colour} {shape}{'s' if count > 1 else ''} {where} {position}"


def _text_document(rng: random.Random) -> str:
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    shape = rng.choice(SHAPES)
    sentences = [f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.",
                 f"a {shape} has {CORNERS[shape]} corners.",
                 f"{NUMBERS[a + 1]} comes after {NUMBERS[a]}."]
    rng.shuffle(sentences)
    return " ".join(sentences)


def write_corpus(out: Path, num_captions: int = 400, num_interleaved: int = 150, num_text: int = 150,
                 seed: int = 0) -> Path:
    """Write raw/demo.jsonl and raw/images/ under out; return the JSONL path."""
    rng = random.Random(seed)
    images = out / "raw" / "images"
    images.mkdir(parents=True, exist_ok=True)
    drawn = 0

    def scene() -> tuple[str, str, int]:
        """Draw a random scene; return its file name, caption and number of shapes."""
        nonlocal drawn
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        count, position = rng.randint(1, 3), rng.choice(POSITIONS)
        name = f"{drawn:05d}.png"
        draw_scene(colour, shape, count, position, rng).save(images / name)
        drawn += 1
        return name, describe_scene(colour, shape, count, position), count

    records = []
    for _ in range(num_captions):
        name, caption, _ = scene()
        records.append({"type": "caption", "image": name, "text": caption})
    for _ in range(num_interleaved):
        segments, total = [{"text": "here are some pictures."}], 0
        for k in range(rng.randint(2, 4)):
            name, caption, count = scene()
            total += count
            segments += [{"image": name}, {"text": f"picture {NUMBERS[k + 1]} shows {caption}."}]
        segments.append({"text": f"in total there are {NUMBERS[total]} shapes."})
        records.append({"type": "interleaved", "segments": segments})
    for _ in range(num_text):
        records.append({"type": "text", "text": _text_document(rng)})
    rng.shuffle(records)
    path = out / "raw" / "demo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _texts(jsonl: Path, out: Path) -> Path:
    """All the corpus's text, one record per line, for tokenizer training."""
    lines = []
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        parts = [r["text"]] if "text" in r else [s["text"] for s in r["segments"] if "text" in s]
        lines.append(" ".join(parts))
    out.write_text("\n".join(lines) + "\n")
    return out


def make_demo(out: str | Path, vocab_size: int = 256, seed: int = 0, progress: bool = False) -> PrepareResult:
    """Generate the demo corpus under `out`, prepare it into shards there and train its tokenizer."""
    out = Path(out)
    jsonl = write_corpus(out, seed=seed)
    result = prepare(jsonl, out / "raw" / "images", out, samples_per_shard=200, progress=progress)
    # The corpus is plain ASCII, so byte fallback would only waste the small vocabulary.
    train_tokenizer([_texts(jsonl, out / "raw" / "text.txt")], out / "tokenizer", vocab_size, byte_fallback=False)
    return result
