"""`mm1 demo` end to end: demo corpus, 4 processes in TP2 x PP2, the loss and the validation loss fall, a caption."""

import json
import sys

from conftest import run


def test_demo_trains_tp2_pp2(tmp_path):
    steps = 16
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "demo", "--out", str(tmp_path), "--steps", str(steps)])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, steps + 1))  # step 0: the validation before training
    assert {"loss", "lm_loss", "lr", "grad_norm"} <= set(rows[1])
    assert rows[1]["loss"] > 6.0  # ln(1024) ~ 6.93 at initialisation
    assert rows[-1]["loss"] < rows[1]["loss"] - 1.0
    assert "lower" in proc.stdout and str(tmp_path) in proc.stdout
    # The held-out loss, before training and at the last step, falls too.
    assert rows[0]["valid_loss"] > 6.0 and rows[-1]["valid_loss"] < rows[0]["valid_loss"] - 1.0
    assert "validation loss (held-out 5%)" in proc.stdout
    # ... and the model captions a new image (mm1 generate's code, on the newest checkpoint).
    assert "a new image" in proc.stdout and "captioned by the model: '" in proc.stdout
