"""`mm1 demo`: generate the embedded demo corpus and train a tiny MM1 on it with 4 processes
in a TP2 x PP2 layout (CPU and gloo without a GPU)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEMO_SETTINGS = [
    "parallel.tensor_model_parallel_size=2",
    "parallel.pipeline_model_parallel_size=2",
    "parallel.sequence_parallel=true",
    "training.warmup_steps=10",
    "checkpoint.save_interval=20",
    # 5% of the corpus held out: its loss before training, every 20 steps and at the end.
    "data.valid_fraction=0.05",
    "training.eval_interval=20",
    "training.eval_iters=2",
]


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.commands import train
    from megatron_mm1.data.demo import make_demo

    out = Path(args.out).resolve()
    data = out / "data"
    train_args = argparse.Namespace(
        config=args.config, out=str(out), data=str(data), steps=args.steps, resume=None, new_schedule=False,
        nproc=args.nproc, dry_run=False, set=[*DEMO_SETTINGS, *args.set],
    )
    if not (data / "tokenizer.model").exists():
        print(f"generating the demo corpus in {data}")
        make_demo(data, progress=True)
    for stale in ("metrics.jsonl", "checkpoints", "tensorboard"):
        shutil.rmtree(out / stale, ignore_errors=True) if (out / stale).is_dir() else (out / stale).unlink(missing_ok=True)
    print(f"training {args.config} for {args.steps} steps on {args.nproc} processes (TP2 x PP2, gloo)")
    start = time.time()
    code = train.run(train_args)
    if code != 0:
        print(f"mm1 demo: training exited with code {code}", file=sys.stderr)
        return code
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-5:]) / min(5, len(steps))
    print(
        f"\ndone in {time.time() - start:.0f}s: loss {first:.3f} at step 1 -> {last:.3f} "
        f"(mean of the last 5 steps), {100 * (first - last) / first:.0f}% lower\n"
        f"  validation loss (held-out 5%): {valid[0]['valid_loss']:.3f} before training -> "
        f"{valid[-1]['valid_loss']:.3f} at step {valid[-1]['step']}\n"
        f"  metrics:      {out / 'metrics.jsonl'}\n"
        f"  tensorboard:  tensorboard --logdir {out / 'tensorboard'}\n"
        f"  checkpoints:  {out / 'checkpoints'} (newest: {(out / 'checkpoints' / 'latest').read_text().strip()})\n"
        f"{_caption_a_new_image(out)}\n"
        "next:\n"
        f"  a run of your own:  mm1 train --config {args.config} --data {data} --out runs/my-run --steps 200 "
        f"--nproc {args.nproc} " + " ".join(f"--set {s}" for s in DEMO_SETTINGS[:3]) + "\n"
        "                      (add --resume auto to continue it after an interruption)\n"
        "  full-size sizes:    mm1 params --config mm1-3b\n"
        "  your own data:      mm1 data prepare --help"
    )
    return 0


def _caption_a_new_image(out: Path) -> str:
    """What the trained model says about a scene drawn now (not in the corpus), with `mm1 generate`'s
    code: the image, then the caption it continues with."""
    import random

    from megatron_mm1.data.demo import describe_scene, draw_scene
    from megatron_mm1.generate import Generator, Sampling
    from megatron_mm1.runtime import shutdown

    scene = ("red", "circle", 2, "left")
    image = out / "new-scene.png"
    draw_scene(*scene, random.Random(2026)).save(image)
    said = Generator(out).generate([("<image>", [image])], Sampling(max_new_tokens=12))[0]["text"]
    shutdown()
    return (f"  a new image ({image}, {describe_scene(*scene)}), captioned by the model: {said!r}\n"
            f"  (mm1 generate --checkpoint {out} --prompt '<image>' --image {image})")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny MM1 on generated data with 4 processes (TP2 x PP2)",
        description="Generate the embedded demo corpus (no download) and train a tiny MM1 on it "
        "in a real TP2 x PP2 layout: 4 processes, gloo on CPU.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--config", default="tiny", help="preset or YAML (default: tiny)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    p.add_argument("--nproc", type=int, default=4, help="processes (default: 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.set_defaults(func=run)
