"""Importing published model families exactly: tiny random-weight models built with transformers'
own classes, saved in transformers 5's config layout and in the layout transformers 4.x wrote
(tests/data/hf4), converted from-hf, compared with the original, trained at TP2 (EP2 for MoE) and
exported back as the same native class. Inexact sources are refused by name."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run

HF4 = ROOT / "tests" / "data" / "hf4"
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
# name -> (model_type, transformers 5 config arguments); the same models as tests/data/hf4/<name>.json.
FAMILIES = {
    "llama3": ("llama", dict(head_dim=16, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama_linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral": ("mistral", dict(head_dim=32, sliding_window=None,
                                rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "mixtral": ("mixtral", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2_moe": ("qwen2_moe", dict(MOE, num_experts=4, shared_expert_intermediate_size=0, mlp_only_layers=[1],
                                    rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "qwen3": ("qwen3", dict(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3_moe": ("qwen3_moe", dict(MOE, head_dim=32, num_experts=4,
                                    rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
LENGTHS = (16, 64, 256)
MAX_ABS_DIFF = 1e-4


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter, norms and biases included, gets non-trivial random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)


def hf_model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[name]
    config = AutoConfig.for_model(model_type, **{**SHAPE, **extra})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed=len(name))
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (the transformers model, its folder in 5's layout, the same weights with the
    4.x config.json)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        model = hf_model(name)
        v5 = root / name / "hf5"
        model.save_pretrained(v5)
        v4 = root / name / "hf4"
        shutil.copytree(v5, v4)
        shutil.copy(HF4 / f"{name}.json", v4 / "config.json")
        out[name] = (model, v5, v4)
    yield out
    from megatron_mm1.runtime import shutdown

    shutdown()


def import_llm(src: Path, out: Path, *sets: str) -> Path:
    from megatron_mm1.hf.importer import from_hf

    return from_hf(src, out, config="tiny", overrides=["training.bf16=false", *sets], progress=False)


def megatron_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_mm1.hf.megatron_io import MegatronCheckpoint
    from megatron_mm1.hf.verify import megatron_logits as logits, megatron_model

    return logits(megatron_model(MegatronCheckpoint(ckpt)), tokens, torch.zeros(0, 3, 56, 56))


def prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(5, 256, (1, n), generator=gen) for n in LENGTHS]


def assert_same_logits(reference: torch.Tensor, candidate: torch.Tensor, what: str) -> None:
    from megatron_mm1.hf.verify import compare

    metrics = compare(reference, candidate)
    assert metrics["max_abs_diff"] < MAX_ABS_DIFF and metrics["top1_agreement"] == 1.0, (what, metrics)


def stored_tensors(ckpt: Path) -> dict:
    from megatron_mm1.hf.megatron_io import MegatronCheckpoint

    reader = MegatronCheckpoint(ckpt)
    return {n: t for names in reader.groups().values() for n, t in reader.read(names).items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_import_equals_the_original_in_both_config_layouts(sources, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from megatron_mm1.checkpoint import load_checkpoint_config
    from megatron_mm1.hf.export import to_hf

    model, v5, v4 = sources[name]
    assert "rope_parameters" not in json.loads((v4 / "config.json").read_text())
    ckpt = import_llm(v5, tmp_path / "ckpt5")
    old = import_llm(v4, tmp_path / "ckpt4")
    # Both layouts describe one model: the same config and bit-identical weights.
    assert load_checkpoint_config(old) == load_checkpoint_config(ckpt)
    a, b = stored_tensors(ckpt), stored_tensors(old)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for tokens in prompts():
        with torch.no_grad():
            reference = model(input_ids=tokens).logits
        assert_same_logits(reference, megatron_logits(ckpt, tokens), f"{name} import, {tokens.shape[1]} tokens")
    # Exported back as the same native class, computing the same.
    exported = to_hf(ckpt, tmp_path / "export", text_only=True, progress=False)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[FAMILIES[name][0]]]
    back = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    for tokens in prompts():
        with torch.no_grad():
            assert_same_logits(model(input_ids=tokens).logits, back(input_ids=tokens).logits, f"{name} export")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run([sys.executable, "-m", "megatron_mm1.cli", "data", "demo", "--out", str(out)])
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_train_at_tp2_then_export(sources, demo_data, tmp_path, name):
    """Two steps at TP2 (EP2 for MoE) from the imported weights; the export loads with
    transformers as the same class, tied embeddings still tied."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from megatron_mm1.checkpoint import latest_checkpoint
    from megatron_mm1.hf.export import to_hf

    model, v5, _ = sources[name]
    ckpt = import_llm(v5, tmp_path / "ckpt")
    layout = ["parallel.tensor_model_parallel_size=2"]
    if model.config.model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        layout += ["parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1",
                   "parallel.sequence_parallel=true"]
    cmd = [sys.executable, "-m", "megatron_mm1.cli", "train", "--config", str(ckpt / "config.yaml"),
           "--data", str(demo_data), "--out", str(tmp_path / "run"), "--steps", "2", "--nproc", "2"]
    for item in [*layout, f"checkpoint.finetune_from={ckpt}", "training.warmup_steps=1"]:
        cmd += ["--set", item]
    run(cmd)
    trained = latest_checkpoint(tmp_path / "run" / "checkpoints")
    exported = to_hf(trained, tmp_path / "export", text_only=True, progress=False)
    back = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    assert type(back).__name__ == ARCHITECTURES[model.config.model_type]
    with safe_open(str(next(exported.glob("*.safetensors"))), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != model.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    # Trained: the weights moved away from the source's.
    assert not torch.equal(back.model.norm.weight, model.model.norm.weight)


def refused(src: Path, out: Path, message: str) -> None:
    from megatron_mm1.config import ConfigError

    with pytest.raises(ConfigError) as error:
        import_llm(src, out)
    assert message in str(error.value), str(error.value)
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


def edited_copy(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of folder `src` with config.json keys replaced and tensors edited in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        merged = {**json.loads((dst / "config.json").read_text()), **config}
        (dst / "config.json").write_text(json.dumps(merged))
    if tensors is not None:
        weights = load_file(dst / "model.safetensors")
        tensors(weights)
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_inexact_sources_are_refused_by_name(sources, tmp_path):
    _, llama, llama4 = sources["llama_linear"]
    out = tmp_path / "out"
    # A key that changes the maths and that MM1 does not know.
    refused(edited_copy(llama, tmp_path / "a", {"attn_logit_softcapping": 30.0}), out,
            "attn_logit_softcapping=30.0: not understood")
    # RoPE types MM1 does not compute exactly, in either layout.
    refused(edited_copy(llama4, tmp_path / "b", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}), out,
            "rope type 'dynamic'")
    yarn = tmp_path / "c"
    shutil.copytree(llama4, yarn)
    shutil.copy(HF4 / "llama_yarn.json", yarn / "config.json")
    refused(yarn, out, "rope type 'yarn'")
    # Sliding-window attention (a Qwen3 with the window on; a Mistral with its 4.x default).
    _, qwen3, _ = sources["qwen3"]
    sliding = edited_copy(qwen3, tmp_path / "d")
    shutil.copy(HF4 / "qwen3_sliding.json", sliding / "config.json")
    refused(sliding, out, "use_sliding_window=True")
    _, mistral, _ = sources["mistral"]
    refused(edited_copy(mistral, tmp_path / "e", {"sliding_window": 4096}), out, "sliding_window=4096")
    # A tensor more than the config says (an output-projection bias), and one fewer.
    extra = edited_copy(llama, tmp_path / "f", tensors=lambda w: w.update(
        {"model.layers.0.self_attn.o_proj.bias": torch.ones(64)}))
    refused(extra, out, "would not read: model.layers.0.self_attn.o_proj.bias")
    missing = edited_copy(llama, tmp_path / "g", tensors=lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    refused(missing, out, "lacks 1 tensor(s) the model needs: model.layers.1.mlp.down_proj.weight")
    # A Qwen2-MoE written by 4.x: no qkv_bias key means biases, and they must be there.
    _, _, qwen2_moe4 = sources["qwen2_moe"]
    dropped = edited_copy(qwen2_moe4, tmp_path / "h", tensors=lambda w: [
        w.pop(k) for k in list(w) if k.endswith("_proj.bias")])
    refused(dropped, out, "lacks 6 tensor(s) the model needs: model.layers.0.self_attn.k_proj.bias")


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_encoder_import_equals_the_original(sources, tmp_path, act):
    """CLIP ViT with GELU (LAION and DFN ViT-H) or QuickGELU (OpenAI): the imported encoder's
    patch features equal CLIPVisionModel's last hidden state without the class token."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from megatron_mm1.hf.importer import from_hf
    from megatron_mm1.hf.megatron_io import MegatronCheckpoint
    from megatron_mm1.hf.verify import megatron_model

    fixture = json.loads((HF4 / f"clip_{act}.json").read_text())
    config = CLIPVisionConfig(**{k: fixture[k] for k in ("image_size", "patch_size", "hidden_size",
                                 "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                                 "layer_norm_eps")})
    clip = CLIPVisionModel(config).eval()
    randomize(clip, seed=7)
    clip.save_pretrained(tmp_path / "clip")
    clip4 = edited_copy(tmp_path / "clip", tmp_path / "clip4")  # the same weights, 4.x's config.json
    shutil.copy(HF4 / f"clip_{act}.json", clip4 / "config.json")
    _, llama, _ = sources["llama3"]
    ckpt, old = (from_hf(llama, tmp_path / f"ckpt{i}", vision_dir=v, config="tiny",
                         overrides=["training.bf16=false"], progress=False)
                 for i, v in enumerate((tmp_path / "clip", clip4)))
    reader = MegatronCheckpoint(ckpt)
    assert reader.cfg.model.vision.activation == act
    assert MegatronCheckpoint(old).cfg == reader.cfg
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = clip(pixel_values=images, output_hidden_states=True).hidden_states[-1][:, 1:]
        features = megatron_model(reader).vision(images)
    assert (reference - features).abs().max() < 1e-4


def test_tied_embeddings_in_the_mm1_export(sources, tmp_path):
    """The full MM1 export (remote code around the native LM) keeps a tied LM tied: its logits
    with images equal megatron's."""
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.verify import verify

    ckpt = import_llm(sources["llama3"][1], tmp_path / "ckpt")
    metrics = verify(ckpt, to_hf(ckpt, tmp_path / "mm1", progress=False))
    assert metrics["max_abs_diff"] < MAX_ABS_DIFF and metrics["top1_agreement"] == 1.0, metrics
