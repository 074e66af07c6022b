"""The configuration that trains is the configuration that is tested: bf16 training through the
training engine at data parallelism 2 with the distributed optimizer, overlap_grad_reduce and
overlap_param_gather (every default of `mm1 train`), dense and MoE, and MoE with its experts
split over the 2 ranks, equals one process training on the same global batches by gradient
accumulation: each step's loss and gradient norm, and the weights after the last step
(tests/bf16_check.py trains them; real gloo process groups, real megatron-core)."""

import json
import sys

import pytest
import torch
from conftest import run, torchrun

SCRIPT = "tests/bf16_check.py"
# The one-process reference: the plain optimizer, gradients reduced after the backward.
REFERENCE = ["training.distributed_optimizer=false", "training.overlap_grad_reduce=false"]
# Experts split over ranks are initialised from other RNG streams: that run starts from the
# reference's weights, loaded as fine-tuning loads them. gloo has no uneven all-gather, which
# expert-TP=2 with the alltoall dispatcher needs.
EP2 = ["--initial", "load", "--set", "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]
RUNS = {"tiny": {"dp2": []}, "tiny-moe": {"dp2": [], "ep2": EP2}}
TRAINED_AS = {"distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True,
              "param_dtypes": ["torch.bfloat16"], "data_parallel_size": 2}

# The tolerance: one bf16 step. Both runs hold weights, activations and gradients in bf16 (8
# significant bits: neighbouring values differ by 2^-8 to 2^-7 relative) and differ only in
# the order of sums. Step 1 starts from the same weights and each micro-batch's forward and
# backward is the same arithmetic (its loss scaled by 1/4 in the reference; by 1/2, then 1/2 at
# the reduction, at DP2: powers of two, exact). The gradients differ by fp32 rounding where
# they are summed over micro-batches and ranks (grad_reduce_in_fp32), 2^-24 relative; with the
# experts split over ranks, an expert's GEMM takes both ranks' tokens at once and rounds its
# weight gradient to bf16 once instead of once per micro-batch, 2^-9. Adam's update m/sqrt(v)
# does not depend on the gradient's scale, so a relative difference d moves an fp32 master
# weight by about lr x d, which changes its bf16 copy only where it lies that close to a
# rounding boundary, and then by one bf16 step. Later steps compute from weights that differ
# so, and a token near a tie between two experts may be routed to the other. Correct runs
# therefore differ by well under one bf16 step: losses and gradient norms by less than 2^-8
# relative, the weights by less than one bf16 spacing each (root mean square over the model).
# Measured at the worst step (loss / gradient norm, relative / weights, in spacings): dense
# dp2 0 / 6e-8 / 0; MoE dp2 8e-6 / 2.3e-4 / 0.03; MoE ep2 9e-6 / 7e-4 / 0.1. What bugs do
# (same measures): a micro-batch dropped and another counted twice on one rank 3e-3 / 0.09 /
# 5.4; parameters not all-gathered after the step, or gathered only after the next forward
# 0.04 / 0.2 / 6; every gradient counted twice (summed over ranks, not averaged) 1e-5 / 1.0 /
# 0.03: Adam's update is blind to the gradient's scale, its norm is not.
BF16_STEP = 2.0**-8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-data")
    run([sys.executable, "-m", "megatron_mm1.cli", "data", "demo", "--out", str(out)])
    return out


@pytest.fixture(scope="module", params=sorted(RUNS))
def runs(request, data, tmp_path_factory):
    config = request.param
    out = tmp_path_factory.mktemp(config)
    common = ["--config", config, "--data", str(data), "--out", str(out)]
    run([sys.executable, SCRIPT, *common, "--tag", "reference", "--initial", "save", "--set", *REFERENCE])
    for tag, args in RUNS[config].items():
        torchrun(2, SCRIPT, *common, "--tag", tag, *args)
    return config, out


def weights(path) -> dict[str, torch.Tensor]:
    """The whole tensors of a weights checkpoint (any layout), read without process groups."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, path.with_suffix(".pt"))
    return {k: v.float() for k, v in torch.load(path.with_suffix(".pt")).items() if isinstance(v, torch.Tensor)}


def norm(tensors) -> float:
    return float(torch.stack([t.norm() for t in tensors]).norm())


def bf16_spacing(w: torch.Tensor) -> torch.Tensor:
    """The distance from each |w| to the next bf16 value."""
    b = w.abs().bfloat16()
    return torch.nextafter(b, torch.full_like(b, torch.inf)).float() - b.float()


def test_bf16_data_and_expert_parallel_training_matches_one_process(runs):
    config, out = runs
    ref = json.loads((out / "reference.json").read_text())
    initial, final = weights(out / "initial" / "model"), weights(out / "reference" / "model")
    tolerance = norm(bf16_spacing(w) for w in final.values())
    # A real run: the loss falls, and the weights moved by far more than the tolerance (17x).
    assert ref["steps"][-1]["loss"] < ref["steps"][0]["loss"]
    assert norm(final[k] - initial[k] for k in final) > 5 * tolerance
    for tag in RUNS[config]:
        result = json.loads((out / f"{tag}.json").read_text())
        assert result["setup"] == {**TRAINED_AS, "expert_model_parallel_size": 2 if "ep2" in tag else 1}
        for step, (a, b) in enumerate(zip(ref["steps"], result["steps"], strict=True), 1):
            for key in ("loss", "grad_norm", "moe_load_balancing_loss", "moe_z_loss")[: 4 if "moe" in config else 2]:
                assert abs(b[key] - a[key]) < BF16_STEP * abs(a[key]), (config, tag, step, key, a[key], b[key])
        trained = weights(out / tag / "model")
        distance = norm(trained[k] - final[k] for k in final)
        assert distance < tolerance, (config, tag, distance / tolerance)


def test_a_bf16_step_trains_the_weights_loaded_without_the_optimizer_state(tmp_path, single_process_runtime):
    """bf16 keeps fp32 master weights in the optimizer: weights loaded without the optimizer
    state (fine-tuning, checkpoint.load_optimizer=false) must reach them, or the first step
    puts the engine's own initialisation back."""
    from megatron_mm1.checkpoint import save_model
    from megatron_mm1.config import load_config
    from megatron_mm1.device import to_device
    from megatron_mm1.engine_base import build_engine
    from megatron_mm1.synthetic import synthetic_microbatch

    # LR 0: the step changes no weight (weight decay scales with the LR too).
    cfg = load_config("tiny", ["training.bf16=true", "training.lr=0", "training.steps=1", "training.warmup_steps=0"])
    source = build_engine(cfg, 1)
    save_model(source.model, tmp_path / "model")
    engine = build_engine(cfg, 1)  # its own random weights, other than the source's
    engine.load(tmp_path, load_optimizer=False)
    engine.train_step([to_device(synthetic_microbatch(cfg, seed=0, images_per_row=[1, 0]))])
    loaded = dict(source.model_chunks()[0].named_parameters())
    reverted = [name for name, p in engine.model_chunks()[0].named_parameters() if not torch.equal(p, loaded[name])]
    assert not reverted, f"the step put the engine's initial weights back: {reverted}"
