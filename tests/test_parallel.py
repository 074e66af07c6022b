"""Loss and gradients at each parallel layout equal one process's, for dense and MoE, from
identical weights, on micro-batches with images at varied positions and counts (real gloo
process groups, real megatron-core)."""

import json
import sys

import pytest
from conftest import run, torchrun

SP = ["parallel.sequence_parallel=true"]
TP2 = ["parallel.tensor_model_parallel_size=2", *SP]
PP2 = ["parallel.pipeline_model_parallel_size=2"]
VPP2 = [*PP2, "parallel.virtual_pipeline_model_parallel_size=2"]
# gloo has no uneven all-gather, which expert-TP=2 with the alltoall dispatcher needs.
EP2 = ["parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]
# The `fast` spec from the one `local` process's weights, its grads loaded back into `local`:
# grouped-GEMM experts split over expert TP (fast-tp2) and expert parallelism.
FAST = ["model.layer_spec=fast"]
# A layout's optional third item, a packing for parallel_check's --packing: `thd` runs the `fast`
# layers with the `te` spec's packing (the rows as one between pipeline stages and under SP).

LAYOUTS = {
    "tiny": {
        "tp2": (2, TP2), "pp2": (2, PP2), "vpp2": (2, VPP2), "tp2pp2": (4, TP2 + PP2),
        "fast-thd-tp2pp2": (4, TP2 + PP2 + FAST, "thd"),
    },
    "tiny-moe": {
        "tp2": (2, TP2),
        "pp2": (2, PP2),
        "vpp2": (2, VPP2),
        "ep2": (2, EP2),
        "tp2pp2": (4, TP2 + PP2),
        "tp2ep2": (4, TP2 + EP2),
        "fast-tp2": (2, TP2 + FAST),
        "fast-ep2": (2, EP2 + FAST),
        "fast-tp2ep2": (4, TP2 + EP2 + FAST),
    },
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def report(request, tmp_path_factory):
    config = request.param
    out = tmp_path_factory.mktemp(config)
    script = "tests/parallel_check.py"
    run([sys.executable, script, "reference", "--config", config, "--out", str(out)])
    for tag, (nproc, overrides, *packing) in LAYOUTS[config].items():
        extra = ["--packing", *packing] if packing else []
        torchrun(nproc, script, "run", "--config", config, "--out", str(out), "--tag", tag, "--set", *overrides, *extra)
    proc = run([sys.executable, script, "compare", "--config", config, "--out", str(out), "--tag", *LAYOUTS[config]])
    line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")][-1]
    return config, json.loads(line[len("REPORT "):])


def test_losses_and_gradients_match_one_process(report):
    config, results = report
    assert set(results) == set(LAYOUTS[config])
    for tag, r in results.items():
        assert r["loss_rel_err"] < TOLERANCE, (config, tag, r)
        assert r["grad_rel_err"] < TOLERANCE, (config, tag, r)
        assert r["loss"] > 1.0, (config, tag, r)  # a real loss on a 1024-token vocabulary
