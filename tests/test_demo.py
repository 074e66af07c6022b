"""`mm1 demo` end to end: demo corpus, 4 processes in TP2 x PP2, the loss and the validation loss fall, a caption."""

import json
import sys

import pytest
from conftest import run

STEPS = 16


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "demo", "--out", str(out), "--steps", str(STEPS)])
    return out, proc.stdout


def test_demo_trains_tp2_pp2(demo_run):
    out, stdout = demo_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, STEPS + 1))  # step 0: the validation before training
    assert {"loss", "lm_loss", "lr", "grad_norm"} <= set(rows[1])
    assert rows[1]["loss"] > 6.0  # ln(1024) ~ 6.93 at initialisation
    assert rows[-1]["loss"] < rows[1]["loss"] - 1.0
    assert "lower" in stdout and str(out) in stdout
    # The held-out loss, before training and at the last step, falls too.
    assert rows[0]["valid_loss"] > 6.0 and rows[-1]["valid_loss"] < rows[0]["valid_loss"] - 1.0
    assert "validation loss (held-out 5%)" in stdout
    # ... and the model captions a new image (mm1 generate's code, on the newest checkpoint).
    assert "a new image" in stdout and "captioned by the model: '" in stdout


def test_the_demo_caption_is_what_the_hugging_face_export_generates(demo_run):
    """On the trained demo checkpoint (TP2 x PP2): the caption `mm1 generate`'s code made equals
    transformers' greedy generate() on the export, from the same image."""
    import ast
    import re

    import torch
    from transformers import AutoModelForImageTextToText

    from megatron_mm1.checkpoint import latest_checkpoint, load_checkpoint_config
    from megatron_mm1.data.tokenizer import EOS_ID, Tokenizer
    from megatron_mm1.generate import encode_prompt
    from megatron_mm1.hf.export import to_hf

    out, stdout = demo_run
    said = ast.literal_eval(re.search(r"captioned by the model: (.*)\n", stdout).group(1))
    ckpt = latest_checkpoint(out / "checkpoints")
    cfg = load_checkpoint_config(ckpt)
    tokenizer = Tokenizer(out / "data" / "tokenizer.model", cfg.model.image_token_id)
    tokens, pixels = encode_prompt("<image>", [out / "new-scene.png"], cfg, tokenizer)
    exported = to_hf(ckpt, out / "hf", tokenizer=out / "data" / "tokenizer.model", progress=False)
    model = AutoModelForImageTextToText.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    padding = list(range(tokenizer.vocab_size, model.config.text_config.vocab_size))
    generated = model.generate(input_ids=tokens, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                               suppress_tokens=padding or None)[0, tokens.shape[1]:].tolist()
    assert said == tokenizer.decode([t for t in generated if t != EOS_ID]) and said
