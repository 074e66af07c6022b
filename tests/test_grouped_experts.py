"""The `fast` spec's grouped-GEMM experts (models/experts.py) equal megatron's SequentialMLP, the
`local` spec's: outputs and every gradient of the experts alone, of a MoE layer and of the whole
tiny-moe model, with experts that receive no tokens; checkpoints load from one spec into the
other. The expert-parallel layouts (alltoall dispatcher) are in test_parallel.py's `fast-*`
layouts; on CUDA (tools/gpu_check.sh) the experts are compared in bf16."""

import dataclasses
from functools import partial

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import build_module
from test_fast_spec import step

from megatron_mm1.checkpoint import load_model, save_model
from megatron_mm1.config import ConfigError, load_config, validate
from megatron_mm1.models.experts import TorchGroupedMLP, as_sequential
from megatron_mm1.models.mm1 import MM1Model, llm_transformer_config
from megatron_mm1.models.specs import llm_block_spec
from megatron_mm1.synthetic import synthetic_microbatch

pytestmark = pytest.mark.usefixtures("single_process_runtime")
CUDA = torch.cuda.is_available()
# bf16's unit roundoff: the two implementations round the results of fc1, the activation, the
# probability product and fc2 each once per path (GEMMs accumulate in fp32 in both), so in
# norm they differ by at most about 2 x 4 roundings.
BF16_RTOL = 8 * 2.0**-8


def config(spec: str, bf16: bool = False, sets=(), **overrides):
    cfg = load_config("tiny-moe", [f"model.layer_spec={spec}", f"training.bf16={bf16}", *sets])
    return dataclasses.replace(llm_transformer_config(cfg), **overrides)


def both(spec: str, bf16: bool, sets, experts: int, **overrides):
    """SequentialMLP and TorchGroupedMLP built from the same seed (so with the same weights)."""
    c, pg = config(spec, bf16, sets, **overrides), get_default_pg_collection()
    built = []
    for cls, extra in ((SequentialMLP, [MLPSubmodules(ColumnParallelLinear, None, RowParallelLinear)]), (TorchGroupedMLP, [])):
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        built.append(cls(experts, c, *extra, pg_collection=pg))
    return built


def assert_equal(got: torch.Tensor, ref: torch.Tensor, what: str, bf16: bool) -> None:
    """Equal to fp32 rounding, or within BF16_RTOL in norm when computed in bf16 (an fp32
    result too: the probabilities' gradient is reduced from bf16 activations)."""
    if bf16:
        err = (got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)
        assert err <= BF16_RTOL, f"{what}: relative error {err:.2e} > {BF16_RTOL:.2e}"
    else:
        torch.testing.assert_close(got, ref, msg=lambda m: f"{what}: {m}")


def run_experts(module, x, probs, counts, grad):
    """Output, and the gradients of the input, the probabilities and each expert's weights."""
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = module(x, torch.tensor(counts), probs)
    assert bias is None
    (out.float() * grad).sum().backward()
    weights = as_sequential({n: p.grad for n, p in module.named_parameters()})
    return out, {"input": x.grad, "probs": probs.grad, **weights}


def compare_experts(spec: str, bf16: bool, counts: list[int], sets=(), device=None, **overrides) -> None:
    seq, grouped = both(spec, bf16, sets, len(counts), **overrides)
    # Same seed, same initialisation order: the same weights without copying them.
    assert as_sequential(grouped.state_dict()).keys() <= seq.state_dict().keys()
    for name, w in as_sequential(grouped.state_dict()).items():
        assert torch.equal(w, seq.state_dict()[name]), name
    dtype = torch.bfloat16 if bf16 else torch.float32
    h = seq.config.hidden_size
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), h, generator=gen).to(device or "cpu", dtype)
    probs = torch.rand(sum(counts), generator=gen).to(x.device)  # fp32: moe_router_dtype
    grad = torch.randn(sum(counts), h, generator=gen).to(x.device)
    ref, ref_grads = run_experts(seq, x, probs, counts, grad)
    got, got_grads = run_experts(grouped, x, probs, counts, grad)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert_equal(got, ref, "output", bf16)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) == 2 + 2 * len(counts)
    for name in ref_grads:
        assert_equal(got_grads[name], ref_grads[name], name, bf16)
    for e, n in enumerate(counts):
        if n == 0:  # no tokens: exactly zero gradients, as SequentialMLP's
            assert not got_grads[f"local_experts.{e}.linear_fc1.weight"].any()
            assert not got_grads[f"local_experts.{e}.linear_fc2.weight"].any()


@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 0, 0], [0, 9, 0, 1]], ids=["one-idle", "none", "two-idle"])
@pytest.mark.parametrize("spec", ["local", "fast"], ids=["eager-swiglu", "fused-swiglu"])
def test_experts_equal_sequential_mlp(spec, counts):
    """fp32, both activation paths (the config of each spec), experts without tokens."""
    compare_experts(spec, False, counts)


def test_experts_equal_sequential_mlp_in_bf16():
    compare_experts("fast", True, [6, 0, 4, 2])


def test_experts_equal_sequential_mlp_with_probs_on_input():
    """Top-1 routing may scale the tokens by the probabilities before the experts instead."""
    top1 = dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True)
    compare_experts("fast", False, [3, 4, 0, 1], **top1)


def test_a_broadcast_gradient_flows():
    """out.sum() hands backward a stride-0 gradient, which torch._grouped_mm's backward refuses."""
    seq, grouped = both("fast", False, (), 2)
    grads = []
    for module in (seq, grouped):
        x = torch.ones(5, module.config.hidden_size, requires_grad=True)
        module(x, torch.tensor([2, 3]), torch.full((5,), 0.5))[0].sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


def record_counts(into: list, module, args, output) -> None:
    """Forward hook: the tokens each expert received."""
    into.append(args[1].tolist())


def moe_layer(spec: str):
    """A MoE layer of the tiny-moe decoder as the spec builds it; expert 3 never chosen."""
    c = config(spec)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    layer = build_module(llm_block_spec(c, kind=spec).layer_specs[0].submodules.mlp, config=c, layer_number=1)
    with torch.no_grad():
        # Positive inputs and router rows: every other expert's logit beats expert 3's zero.
        layer.router.weight.abs_()[3] = 0
    return layer


def test_moe_layer_equals_local():
    local, fast = moe_layer("local"), moe_layer("fast")
    assert type(local.experts) is SequentialMLP and type(fast.experts) is TorchGroupedMLP
    local.load_state_dict(as_sequential(fast.state_dict()))
    counts = {}
    for name, layer in (("local", local), ("fast", fast)):
        layer.experts.register_forward_hook(partial(record_counts, counts.setdefault(name, [])))
    x = torch.rand(16, 2, local.config.hidden_size, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, layer in (("local", local), ("fast", fast)):
        inp = x.clone().requires_grad_()
        out, _ = layer(inp)
        (out * grad).sum().backward()
        grads = dict(inp=inp.grad, **{n: p.grad for n, p in layer.named_parameters()})
        results[name] = out, as_sequential(grads)
    (seen,) = counts["fast"]
    assert counts["local"] == counts["fast"] and seen[3] == 0 and sum(seen) == 2 * x.numel() // x.shape[-1]
    torch.testing.assert_close(results["fast"][0], results["local"][0])
    assert results["fast"][1].keys() == results["local"][1].keys()
    for name, g in results["local"][1].items():
        torch.testing.assert_close(results["fast"][1][name], g, msg=lambda m: f"{name}: {m}")


def state(model) -> dict:
    return {k: v for k, v in as_sequential(model.state_dict()).items() if not k.endswith("_extra_state")}


def test_checkpoints_load_across_specs_and_the_model_equals_local(tmp_path):
    """A `local` checkpoint loads into `fast` (same loss, every gradient) and back; with six
    experts whose router rows are w, -w, u, -u, 0, 0, experts 4 and 5 never get a token."""
    cfg = load_config("tiny-moe", ["model.moe.num_experts=6"])
    torch.manual_seed(0)
    local = MM1Model(cfg)
    with torch.no_grad():
        for layer in local.llm.decoder.layers:
            if hasattr(layer.mlp, "router"):
                w = layer.mlp.router.weight
                w[1], w[3], w[4:] = -w[0], -w[2], 0
    save_model([local], tmp_path / "local")
    fast_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layer_spec="fast"))
    torch.manual_seed(1)  # other weights than local's until loaded
    fast = MM1Model(fast_cfg)
    assert any(isinstance(m, TorchGroupedMLP) for m in fast.modules())
    assert not all(torch.equal(state(fast)[k], v) for k, v in state(local).items())
    load_model([fast], tmp_path / "local")
    assert state(fast).keys() == state(local).keys()
    for k, v in state(local).items():
        assert torch.equal(state(fast)[k], v), k
    counts = []
    for m in fast.modules():
        if isinstance(m, TorchGroupedMLP):
            m.register_forward_hook(partial(record_counts, counts))
    batch = synthetic_microbatch(cfg, seed=11, images_per_row=[2, 1])
    ref, got = step(local, batch), step(fast, batch)
    assert len(counts) == 2 * 2 and all(c[4] == c[5] == 0 and min(c[:4]) > 0 for c in counts), counts
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    got_grads = as_sequential(got[2])
    assert got_grads.keys() == ref[2].keys()
    for name, g in ref[2].items():
        torch.testing.assert_close(got_grads[name], g, msg=lambda m: f"{name}: {m}")
    # and back: fast's checkpoint into a fresh local model
    save_model([fast], tmp_path / "fast")
    torch.manual_seed(2)
    again = MM1Model(cfg)
    load_model([again], tmp_path / "fast")
    for k, v in state(local).items():
        assert torch.equal(state(again)[k], v), k


def test_misaligned_sizes_are_refused_for_fast_only():
    """34 fp32 or bf16 values are 136 or 68 bytes, not a multiple of 16."""
    odd = "model.moe.ffn_hidden_size=34"
    validate(load_config("tiny-moe", [odd]))
    with pytest.raises(ConfigError, match="grouped GEMMs, which need .* multiples of 4"):
        validate(load_config("tiny-moe", [odd, "model.layer_spec=fast"]))
    with pytest.raises(ConfigError, match="multiples of 8"):
        validate(load_config("tiny-moe", [odd, "model.layer_spec=fast", "training.bf16=true"]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: tools/gpu_check.sh runs it")
def test_experts_equal_sequential_mlp_on_cuda_bf16():
    """On CUDA in bf16, torch._grouped_mm's CUTLASS kernel (Hopper, Blackwell) or its fallback:
    MM1-like widths, eight experts of which two get no tokens."""
    sets = ["model.llm.hidden_size=1024", "model.moe.ffn_hidden_size=2048", "model.moe.num_experts=8"]
    compare_experts("fast", True, [300, 0, 17, 1, 512, 0, 64, 130], sets, device="cuda")
