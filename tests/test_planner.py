"""The layout planner: per-rank parameter counts equal real models' at TP2, PP2 (with virtual
stages) and EP2 (real gloo processes; this file is also the torchrun worker); the activation
bytes it assumes per layer equal what real layers save for backward; every proposed layout
passes config.validate, and the acceptance plans find layouts that fit.

  torchrun --nproc-per-node 2 tests/test_planner.py OUT_DIR

The GPU's own share of memory (allocator, NCCL, CUDA context) needs a GPU to check.
"""

import json
import re
import sys
from pathlib import Path

import pytest

from megatron_mm1.arithmetic import (
    connector_activation_bytes,
    layer_activation_bytes,
    mask_bytes,
    vision_layer_activation_bytes,
)
from megatron_mm1.config import CONFIG_DIR, load_config, validate
from megatron_mm1.planner import GPUS, apply_layout, evaluate_config_layout, plan, rank_parameters
from megatron_mm1.saved_tensors import saved_bytes

# (config, overrides) built at 2 processes; EP2 needs DP2 for its expert layout.
LAYOUTS = [
    ("tiny", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    ("tiny", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "model.layer_spec=fast"]),
    ("tiny", ["parallel.pipeline_model_parallel_size=2"]),
    ("tiny", ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]),
    # Imported-model features: the last stage's copy of a tied embedding, q/k/v biases, wider heads,
    # a SigLIP encoder.
    ("tiny", ["parallel.pipeline_model_parallel_size=2", "model.llm.tie_embeddings=true", "model.llm.qkv_bias=true",
              "model.llm.kv_channels=32", "model.vision.arch=siglip", "model.vision.activation=gelu_pytorch_tanh"]),
    ("tiny-moe", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    ("tiny-moe", ["parallel.pipeline_model_parallel_size=2"]),
    ("tiny-moe", ["parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]),
    ("tiny-moe", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                  "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]),
]


def worker(out_dir: Path) -> None:
    """Build each layout's real model on this rank and write its parameter counts and (without
    PP) the activation bytes its layers save beside the planner's to OUT_DIR/rank{N}.jsonl (one
    file per rank: two ranks' lines on one pipe can interleave)."""
    import torch
    from megatron.core import parallel_state

    from megatron_mm1.models.mm1 import build_model
    from megatron_mm1.runtime import init_runtime, quiet_third_party_warnings, shutdown
    from megatron_mm1.synthetic import synthetic_microbatch

    quiet_third_party_warnings()
    rows = []
    for config, overrides in LAYOUTS:
        cfg = load_config(config, overrides + ["training.bf16=true"])
        init_runtime(cfg)
        chunks = build_model(cfg)
        named = [(n, p) for c in chunks for n, p in c.named_parameters()]
        real = {
            "total": sum(p.numel() for _, p in named),
            "expert": sum(p.numel() for n, p in named if ".experts." in n),
        }
        planned = rank_parameters(cfg, parallel_state.get_pipeline_model_parallel_rank())
        row = {"config": config, "overrides": overrides, "rank": torch.distributed.get_rank(),
               "real": real, "planned": planned}
        if cfg.parallel.pipeline_model_parallel_size == 1:
            model, moe = chunks[0], cfg.model.moe
            batch = synthetic_microbatch(cfg, seed=1, images_per_row=[0])
            saved = saved_bytes(
                model.llm.decoder.layers,
                lambda: model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"]),
            )
            # Layer 0 also saves the shared mask; with MoE every layer_freq-th layer is MoE.
            row["activations"] = [
                {"real": {name: b / cfg.data.seq_length for name, b in saved[i].items()},
                 "planned": layer_activation_bytes(cfg, moe.num_experts > 0 and i % moe.layer_freq == 0),
                 "spec": cfg.model.layer_spec}
                for i in range(1, len(saved))
            ]
        rows.append(row)
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
    # Activation bytes at TP2 + SP and EP2. Expert inputs depend on routing, which gives a rank
    # more or fewer tokens than average: compare the mean over the two ranks.
    ranks = {}
    for r in rows:
        if "activations" in r:
            ranks.setdefault((r["config"], *r["overrides"]), []).append(r)
    assert len(ranks) == 5 and all(len(pair) == 2 for pair in ranks.values())
    for a, b in ranks.values():
        cfg = load_config(a["config"], a["overrides"])
        for la, lb in zip(a["activations"], b["activations"]):
            for name, planned in la["planned"].items():
                if la["spec"] == "local" and "layernorm" in name:
                    continue  # CPU's eager RMSNorm: see test_llm_activation_bytes_equal_saved_tensors
                real = (la["real"][name] + lb["real"][name]) / 2 - cpu_only_bytes(cfg, name)
                assert planned == pytest.approx(real, rel=0.01), (a["overrides"], name, la, lb)


def cpu_only_bytes(cfg, name: str) -> float:
    """Per token, what a layer's submodule keeps on the CPU beyond the planner's GPU model: the
    fast spec's attention there runs one packed sample at a time and keeps each one's output
    besides their concatenation (the output projection's input); varlen flash attention on a GPU
    writes one output that the projection reads in place."""
    llm = cfg.model.llm
    if cfg.model.layer_spec == "fast" and name == "self_attention":
        return 2 * llm.num_attention_heads * llm.head_dim / cfg.parallel.tensor_model_parallel_size
    return 0.0


# Wide enough that every term matters; GQA and plain multi-head attention store V differently.
ACTIVATION_SIZES = ["model.llm.num_layers=2", "model.llm.hidden_size=256", "model.llm.ffn_hidden_size=512",
                    "model.llm.num_attention_heads=8", "data.seq_length=256", "training.bf16=true"]


@pytest.mark.parametrize("config, spec, extra", [
    ("tiny", "fast", ["model.llm.num_query_groups=2"]),
    ("tiny", "local", ["model.llm.num_query_groups=2"]),
    ("tiny", "local", ["model.llm.num_query_groups=8"]),
    ("tiny", "local", ["model.llm.num_query_groups=2", "training.recompute_llm=selective"]),
    ("tiny-moe", "fast", ["model.llm.num_query_groups=2", "model.moe.layer_freq=1"]),
    ("tiny-moe", "local", ["model.llm.num_query_groups=8", "model.moe.layer_freq=1"]),
], ids=["dense-fast-gqa", "dense-local-gqa", "dense-local-mha", "dense-local-gqa-selective", "moe-fast-gqa",
        "moe-local-mha"])
def test_llm_activation_bytes_equal_saved_tensors(config, spec, extra):
    from megatron_mm1.models.mm1 import MM1Model
    from megatron_mm1.runtime import single_process
    from megatron_mm1.synthetic import synthetic_microbatch

    cfg = single_process(load_config(config, ACTIVATION_SIZES + extra + [f"model.layer_spec={spec}"]))
    model = MM1Model(cfg)
    batch = synthetic_microbatch(cfg, seed=1, images_per_row=[0])
    layers = model.llm.decoder.layers
    saved = saved_bytes(layers, lambda: model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"]))
    tokens = cfg.data.seq_length
    planned = layer_activation_bytes(cfg, moe_layer=config == "tiny-moe")
    real = {name: nbytes / tokens - cpu_only_bytes(cfg, name) for name, nbytes in saved[1].items()}
    assert real.keys() == planned.keys()
    if spec == "local":
        # CPU's eager RMSNorm keeps two fp32 copies of its input; CUDA's fused kernel keeps the
        # input and 1/rms, as the compiled norm of the fast spec does on both (checked there).
        del real["input_layernorm"], real["pre_mlp_layernorm"]
    for name, value in real.items():
        assert planned[name] == pytest.approx(value, rel=0.01), (name, real, planned)
    # The mask is saved once, by the first layer, for all of them (the fast spec has none).
    shared = (saved[0]["self_attention"] - saved[1]["self_attention"]) / tokens
    assert shared == mask_bytes(cfg)


ACTIVATIONS = {"clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}


@pytest.mark.parametrize("arch", ACTIVATIONS)
@pytest.mark.parametrize("spec", ["local", "fast"])
def test_vision_activation_bytes_equal_saved_tensors(spec, arch):
    import torch

    from megatron_mm1.models.mm1 import vision_encoder
    from megatron_mm1.runtime import single_process

    cfg = single_process(load_config("tiny", ["training.bf16=true", f"model.layer_spec={spec}",
                                              f"model.vision.arch={arch}", f"model.vision.activation={ACTIVATIONS[arch]}"]))
    encoder = vision_encoder(cfg)
    v = cfg.model.vision
    images = torch.randn(3, 3, v.image_size, v.image_size, dtype=torch.bfloat16)
    saved = saved_bytes(encoder.transformer.layers, lambda: encoder(images))
    tokens = 3 * v.sequence_length
    planned = vision_layer_activation_bytes(cfg)
    for layer in saved:
        assert layer.keys() == planned.keys()
        for name, nbytes in layer.items():
            # rel: CPU's LayerNorm keeps its mean and 1/std in bf16, CUDA's in fp32.
            assert planned[name] == pytest.approx(nbytes / tokens, rel=0.04), (name, layer, planned)


@pytest.mark.parametrize("config", ["tiny", "mm1-3b"])
def test_connector_activation_bytes_near_saved_tensors(config):
    import torch

    from megatron_mm1.models.mm1 import image_connector
    from megatron_mm1.runtime import single_process

    cfg = single_process(load_config(config, ["training.bf16=true"]))
    connector, v = image_connector(cfg), cfg.model.vision
    features = torch.randn(2, v.num_patches, v.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_bytes([connector], lambda: connector(features))
    assert connector_activation_bytes(cfg, 2) == pytest.approx(sum(saved[0].values()), rel=0.2)


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

    cfg = load_config("mm1-7b", ["model.layer_spec=local"])
    base = Layout(tp=2, pp=1, vpp=None, ep=1, etp=2, dp=4, micro_batch=1, recompute="none", sequence_parallel=True)
    m = memory_per_gpu(cfg, base, 16)
    tp4 = memory_per_gpu(cfg, Layout(4, 1, None, 1, 4, 2, 1, "none", True), 16)
    rec = memory_per_gpu(cfg, Layout(2, 1, None, 1, 2, 4, 1, "full", True), 16)
    selective = memory_per_gpu(cfg, Layout(2, 1, None, 1, 2, 4, 1, "selective", True), 16)
    no_sp = memory_per_gpu(cfg, Layout(2, 1, None, 1, 2, 4, 1, "none", False), 16)
    assert tp4["weights"] == pytest.approx(m["weights"] / 2, rel=0.1)
    assert rec["activations"] < m["activations"] / 2  # vision and logits are not recomputed
    assert rec["activations"] < selective["activations"] < m["activations"]  # local spec: s x s probabilities
    assert rec["weights"] == m["weights"]
    assert no_sp["activations"] > m["activations"]  # the norms' side keeps the whole sequence
    cfg_applied = apply_layout(cfg, base)
    assert cfg_applied.parallel.sequence_parallel


# Each MM1 preset's own layout, on the GPU count its YAML names (8 H100-80GB per node).
PRESET_GPUS = {"mm1-3b": 8, "mm1-7b": 16, "mm1-30b": 64, "mm1-3b-moe-64e": 64, "mm1-7b-moe-32e": 64}


@pytest.mark.parametrize("preset", sorted(PRESET_GPUS))
def test_presets_fit_h100_at_the_gpu_count_they_name(preset):
    gpus = PRESET_GPUS[preset]
    comment = re.search(r"^# Layout sized for .*: mm1 plan --config (\S+) --gpus (\d+) --gpu-type h100-80gb$",
                        (CONFIG_DIR / f"{preset}.yaml").read_text(), re.M)
    assert comment and comment.groups() == (preset, str(gpus))
    cfg = load_config(preset)
    own = evaluate_config_layout(cfg, gpus, GPUS["h100-80gb"])
    assert own["fits"] and own["reason"] is None, own
    assert cfg.training.global_batch_size == 512
    p = cfg.parallel
    assert own["layout"]["dp"] * p.tensor_model_parallel_size * p.pipeline_model_parallel_size == gpus
    mem = own["memory_gib"]
    parts = ("weights", "gradients", "optimizer", "activations", "reserved")
    assert mem["total"] == pytest.approx(sum(mem[k] for k in parts), abs=0.03) and mem["total"] <= 79.6


def plan_json(capsys, *argv: str) -> dict:
    from megatron_mm1.cli import main

    main(["plan", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


def test_plan_reports_the_configs_own_layout(capsys):
    # As configured: TP1 x PP1 without SP is not what the planner proposes for 30B; it cannot fit.
    sets = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
            "parallel.sequence_parallel=false"]
    result = plan_json(capsys, "--config", "mm1-30b", "--gpus", "8", "--gpu-type", "h100-80gb",
                       *[a for s in sets for a in ("--set", s)])
    own = result["preset_layout"]
    assert set(own) == {"fits", "layout", "name", "memory_gib", "reason"}
    assert own["fits"] is False and own["name"] == "tp1pp1dp8-mbs1"
    assert own["layout"] == {"tp": 1, "pp": 1, "vpp": None, "ep": 1, "etp": 1, "dp": 8, "micro_batch": 1,
                             "recompute": "none", "sequence_parallel": False}
    assert "GiB" in own["reason"] and own["memory_gib"]["total"] > 79.6
    # The same layout among the candidates gets the same estimate.
    by_name = {r["name"]: r for r in result["rejected"]}
    assert by_name["tp1pp1dp8-mbs1"]["memory_gib"] == own["memory_gib"]
    # A world size the layout does not divide: refused with config.validate's message.
    own = plan_json(capsys, "--config", "mm1-30b", "--gpus", "12")["preset_layout"]
    assert own["fits"] is False and own["memory_gib"] is None and own["layout"]["dp"] is None
    assert "world size 12 is not divisible" in own["reason"]


def test_own_layout_is_evaluated_as_configured():
    # mm1-3b's own layout at 8 GPUs is the planner's first; at the local spec with micro-batch 4
    # and no recomputation its [heads, s, s] attention probabilities do not fit.
    gpu = GPUS["h100-80gb"]
    result = plan(load_config("mm1-3b"), 8, gpu)
    assert result["preset_layout"]["layout"] == result["fits"][0]["layout"]
    assert result["preset_layout"]["memory_gib"] == result["fits"][0]["memory_gib"]
    cfg = load_config("mm1-3b", ["model.layer_spec=local", "training.micro_batch_size=4"])
    own = evaluate_config_layout(cfg, 8, gpu)
    assert not own["fits"] and "largest: activations" in own["reason"]
    assert evaluate_config_layout(cfg, 8, GPUS["h200-141gb"])["memory_gib"] == own["memory_gib"]
    assert evaluate_config_layout(load_config("mm1-3b", ["training.recompute_llm=full"]), 8, gpu)["memory_gib"][
        "activations"] < result["preset_layout"]["memory_gib"]["activations"]


def test_train_warns_on_a_gpu_when_the_layout_does_not_fit(monkeypatch, capsys):
    from types import SimpleNamespace

    import torch

    from megatron_mm1.commands.train import warn_if_layout_does_not_fit

    device = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_520_809_984)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: device)
    warn_if_layout_does_not_fit(load_config("mm1-3b"), 8, 0)
    assert capsys.readouterr().err == ""
    # The GPU is what the device reports: mm1-3b's 57.2 GiB do not fit 39.4 GiB.
    device = SimpleNamespace(name="NVIDIA A100-SXM4-40GB", total_memory=42_298_834_944)
    warn_if_layout_does_not_fit(load_config("mm1-3b"), 8, 0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("WARNING: ") for line in err), err
    assert "tp1pp1dp8-mbs1 is estimated not to fit 8 x NVIDIA A100-SXM4-40GB" in err[0] and "39.4 GiB" in err[0]
    assert "--set parallel.tensor_model_parallel_size=2" in err[1]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)
