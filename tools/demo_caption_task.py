"""A caption task of new demo scenes (drawn now, not in the demo corpus) for `mm1 eval`:
OUT/shapes.jsonl and OUT/<i>.png, each scene's description as its one reference.

    python tools/demo_caption_task.py --out runs/shapes-task --count 24
    mm1 eval --checkpoint runs/demo --task caption:runs/shapes-task/shapes.jsonl --max-new-tokens 12
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from megatron_mm1.data.demo import COLOURS, POSITIONS, SHAPES, describe_scene, draw_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    with open(args.out / "shapes.jsonl", "w") as f:
        for i in range(args.count):
            scene = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3), rng.choice(POSITIONS))
            draw_scene(*scene, rng).save(args.out / f"{i}.png")
            f.write(json.dumps({"id": i, "image": f"{i}.png", "references": [describe_scene(*scene)]}) + "\n")
    print(f"wrote {args.out / 'shapes.jsonl'} ({args.count} scenes)")


if __name__ == "__main__":
    main()
