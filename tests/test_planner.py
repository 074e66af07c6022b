"""The layout planner: per-rank parameter counts equal real models' at TP2, PP2 (with virtual
stages) and EP2 (real gloo processes; this file is also the torchrun worker), every proposed
layout passes config.validate, and the acceptance plans find layouts that fit.

  torchrun --nproc-per-node 2 tests/test_planner.py OUT_DIR

Per-GPU memory is a model and cannot be checked without a GPU.
"""

import json
import sys
from pathlib import Path

import pytest

from megatron_mm1.config import load_config, validate
from megatron_mm1.planner import GPUS, apply_layout, plan, rank_parameters

# (config, overrides) built at 2 processes; EP2 needs DP2 for its expert layout.
LAYOUTS = [
    ("tiny", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    ("tiny", ["parallel.pipeline_model_parallel_size=2"]),
    ("tiny", ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]),
    ("tiny-moe", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    ("tiny-moe", ["parallel.pipeline_model_parallel_size=2"]),
    ("tiny-moe", ["parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]),
    ("tiny-moe", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                  "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]),
]


def worker(out_dir: Path) -> None:
    """Build each layout's real model on this rank and write its counts beside the planner's to
    OUT_DIR/rank{N}.jsonl (one file per rank: two ranks' lines on one pipe can interleave)."""
    import torch
    from megatron.core import parallel_state

    from megatron_mm1.models.mm1 import build_model
    from megatron_mm1.runtime import init_runtime, quiet_third_party_warnings, shutdown

    quiet_third_party_warnings()
    rows = []
    for config, overrides in LAYOUTS:
        cfg = load_config(config, overrides)
        init_runtime(cfg)
        chunks = build_model(cfg)
        named = [(n, p) for c in chunks for n, p in c.named_parameters()]
        real = {
            "total": sum(p.numel() for _, p in named),
            "expert": sum(p.numel() for n, p in named if ".experts." in n),
        }
        planned = rank_parameters(cfg, parallel_state.get_pipeline_model_parallel_rank())
        rows.append({"config": config, "overrides": overrides, "rank": torch.distributed.get_rank(),
                     "real": real, "planned": planned})
        parallel_state.destroy_model_parallel()
    rank = torch.distributed.get_rank()
    shutdown()
    (out_dir / f"rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_parameters_per_rank_equal_real_models(tmp_path):
    from conftest import torchrun

    torchrun(2, "tests/test_planner.py", str(tmp_path), timeout=300)
    rows = [json.loads(line) for f in sorted(tmp_path.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    assert len(rows) == 2 * len(LAYOUTS)
    for row in rows:
        assert row["real"]["total"] == row["planned"]["total"], row
        assert row["real"]["expert"] == row["planned"]["expert"], row
    # The layouts split the model: some rank holds less than the whole.
    whole = {c: rank_parameters(load_config(c), 0)["total"] for c in ("tiny", "tiny-moe")}
    assert all(r["real"]["total"] < whole[r["config"]] for r in rows)


@pytest.mark.parametrize("config, gpus", [("mm1-30b", 64), ("mm1-3b-moe-64e", 128), ("tiny-moe", 8)])
def test_plan_proposes_only_valid_layouts_that_fit(config, gpus):
    cfg = load_config(config)
    gpu = GPUS["h100-80gb"]
    result = plan(cfg, gpus, gpu)
    assert result["fits"], result["rejected"][:5]
    for fit in result["fits"]:
        validate(load_config(config, fit["overrides"]), world_size=gpus)
        assert fit["memory_gib"]["total"] <= gpu.memory_gib
    assert result["fits"][0]["relative_throughput"] == 1.0
    assert all(r["reason"] for r in result["rejected"])


def test_rejections_give_the_reason():
    cfg = load_config("mm1-30b")
    result = plan(cfg, 64, GPUS["h100-80gb"])
    by_name = {r["name"]: r["reason"] for r in result["rejected"]}
    # 52 heads do not split 8 ways; TP1 x PP1 cannot hold 30B parameters with Adam.
    assert "num_attention_heads=52 is not divisible" in by_name["tp8pp1dp8-mbs1"]
    assert "GiB" in by_name["tp1pp1dp64-mbs1"]
    assert all("training.recompute_llm=" in " ".join(f["overrides"]) for f in result["fits"])


def test_memory_falls_with_model_parallelism_and_recomputation():
    from megatron_mm1.planner import Layout, memory_per_gpu

    cfg = load_config("mm1-7b")
    base = Layout(tp=2, pp=1, vpp=None, ep=1, etp=2, dp=4, micro_batch=1, recompute="none")
    m = memory_per_gpu(cfg, base, 16)
    tp4 = memory_per_gpu(cfg, Layout(4, 1, None, 1, 4, 2, 1, "none"), 16)
    rec = memory_per_gpu(cfg, Layout(2, 1, None, 1, 2, 4, 1, "full"), 16)
    selective = memory_per_gpu(cfg, Layout(2, 1, None, 1, 2, 4, 1, "selective"), 16)
    assert tp4["weights"] == pytest.approx(m["weights"] / 2, rel=0.1)
    assert rec["activations"] < m["activations"] / 2  # vision and logits are not recomputed
    assert rec["activations"] < selective["activations"] < m["activations"]  # local spec: s x s probabilities
    assert rec["weights"] == m["weights"]
    cfg_applied = apply_layout(cfg, base)
    assert cfg_applied.parallel.sequence_parallel


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)
