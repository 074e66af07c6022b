"""`mm1 demo` end to end: demo corpus, 4 processes in TP2 x PP2, the loss falls."""

import json
import sys

from conftest import run


def test_demo_trains_tp2_pp2(tmp_path):
    steps = 16
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "demo", "--out", str(tmp_path), "--steps", str(steps)])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {"loss", "lm_loss", "lr", "grad_norm"} <= set(rows[0])
    assert rows[0]["loss"] > 6.0  # ln(1024) ~ 6.93 at initialisation
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert "lower" in proc.stdout and str(tmp_path) in proc.stdout
