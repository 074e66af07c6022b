"""Importing published model families exactly: tiny random-weight LLMs and vision towers (CLIP,
SigLIP, SigLIP2) built with transformers' own classes, saved in transformers 5's config layout and in
the layout transformers 4.x wrote (tests/data/hf4), converted from-hf, compared with the original,
trained at TP2 (EP2 for MoE) and exported back as the same native classes. Inexact sources are
refused by name."""

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
    # Qwen2.5's long-context YaRN.
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=128))),
    "qwen2_moe": ("qwen2_moe", dict(MOE, num_experts=4, shared_expert_intermediate_size=0, mlp_only_layers=[1],
                                    rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "qwen3": ("qwen3", dict(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3_moe": ("qwen3_moe", dict(MOE, head_dim=32, num_experts=4,
                                    rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
# RoPE scaling variants beyond FAMILIES' (5's layout): YaRN's frequencies, ramp options and
# attention factor; dynamic NTK, which changes nothing up to max_position_embeddings.
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
ROPE_VARIANTS = {
    "dynamic": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama": ("llama", dict(head_dim=16, rope_parameters=YARN)),
    "qwen2": ("qwen2", dict(rope_parameters=dict(YARN, original_max_position_embeddings=32))),
    "attention_factor": ("llama", dict(rope_parameters=dict(YARN, attention_factor=1.7))),
    "mscale": ("llama", dict(rope_parameters=dict(YARN, mscale=1.3, mscale_all_dim=0.6))),
    "no_truncate_betas": ("llama", dict(rope_parameters=dict(YARN, truncate=False, beta_fast=8.0, beta_slow=0.5))),
}
LENGTHS = (16, 64, 256)
MAX_ABS_DIFF = 1e-4


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter, norms and biases included, gets non-trivial random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)


def hf_model(name: str, families: dict = FAMILIES):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = families[name]
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


# tests/data/hf4 fixture -> transformers vision class; the transformers 5 model is built from the
# fixture's shape (56 px, 14 px patches: a 4 x 4 grid).
ENCODERS = {"clip_gelu": "CLIPVisionModel", "clip_quick_gelu": "CLIPVisionModel",
            "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}
ENCODER_KEYS = ("image_size", "num_patches", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "hidden_act", "layer_norm_eps")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """name -> (the transformers vision model, its folder, the 4.x config.json it matches)."""
    import transformers
    from transformers import AutoConfig

    out = {}
    for name, cls in ENCODERS.items():
        fixture = json.loads((HF4 / f"{name}.json").read_text())
        config = AutoConfig.for_model(fixture["model_type"], **{k: fixture[k] for k in ENCODER_KEYS if k in fixture})
        tower = getattr(transformers, cls)(config).eval()
        randomize(tower, seed=7)
        folder = tmp_path_factory.mktemp(name)
        tower.save_pretrained(folder)
        out[name] = (tower, folder, fixture)
    return out


def import_mm1(sources, vision: Path, out: Path) -> Path:
    """The llama3 source with a vision tower."""
    from megatron_mm1.hf.importer import from_hf

    return from_hf(sources["llama3"][1], out, vision_dir=vision, config="tiny", overrides=["training.bf16=false"],
                   progress=False)


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


@pytest.mark.parametrize("name", ROPE_VARIANTS)
def test_rope_scaling_imports_and_exports_exactly(single_process_runtime, tmp_path, name):
    """YaRN's frequencies, ramp options and attention factor (as the softmax scale m^2/sqrt(d)),
    the Llama one also from the config.json 4.x wrote (factor 4, though max_position_embeddings /
    original_max_position_embeddings is 8: read as transformers 4.56+ and 5 read it); dynamic NTK
    up to max_position_embeddings; each exported back as itself."""
    from transformers import AutoModelForCausalLM

    from megatron_mm1.checkpoint import load_checkpoint_config
    from megatron_mm1.hf.export import to_hf

    model = hf_model(name, ROPE_VARIANTS)
    model.save_pretrained(tmp_path / "hf")
    ckpt = import_llm(tmp_path / "hf", tmp_path / "ckpt")
    if name == "llama":
        old = edited_copy(tmp_path / "hf", tmp_path / "hf4")
        shutil.copy(HF4 / "llama_yarn.json", old / "config.json")
        assert load_checkpoint_config(import_llm(old, tmp_path / "ckpt4")) == load_checkpoint_config(ckpt)
    exported = to_hf(ckpt, tmp_path / "export", text_only=True, progress=False)
    back = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_type"] == model.config.rope_parameters["rope_type"]
    for tokens in prompts():
        with torch.no_grad():
            reference = model(input_ids=tokens).logits
            assert_same_logits(reference, megatron_logits(ckpt, tokens), f"{name}, {tokens.shape[1]} tokens")
            assert_same_logits(reference, back(input_ids=tokens).logits, f"{name} export")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run([sys.executable, "-m", "megatron_mm1.cli", "data", "demo", "--out", str(out)])
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_train_at_tp2_then_export(sources, towers, demo_data, tmp_path, name):
    """Two steps at TP2 (EP2 for MoE) from the imported weights, with one of the vision towers
    (each family another). The text-only export loads with transformers as the same class, tied
    embeddings still tied; the MM1 export loads with the encoder's class, every tensor present."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from megatron_mm1.checkpoint import latest_checkpoint
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.importer import from_hf

    model, v5, _ = sources[name]
    encoder = list(ENCODERS)[list(FAMILIES).index(name) % len(ENCODERS)]
    tower, tower_dir, _ = towers[encoder]
    ckpt = from_hf(v5, tmp_path / "ckpt", vision_dir=tower_dir, config="tiny", overrides=["training.bf16=false"],
                   progress=False)
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
    exported = to_hf(tmp_path / "run", tmp_path / "export", text_only=True, progress=False)  # its newest
    back = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    assert type(back).__name__ == ARCHITECTURES[model.config.model_type]
    with safe_open(str(next(exported.glob("*.safetensors"))), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != model.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    # Trained: the weights moved away from the source's.
    assert not torch.equal(back.model.norm.weight, model.model.norm.weight)
    mm1, info = AutoModelForImageTextToText.from_pretrained(
        to_hf(trained, tmp_path / "mm1", progress=False), trust_remote_code=True, dtype=torch.float32,
        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(mm1.vision_tower).__name__ == ENCODERS[encoder]
    fc1 = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(dict(mm1.vision_tower.named_parameters())[fc1], dict(tower.named_parameters())[fc1])


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
    refused(edited_copy(llama4, tmp_path / "b", {"rope_scaling": {
        "type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}), out, "rope type 'longrope'")
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


def encoder_features(model, images: torch.Tensor) -> torch.Tensor:
    """The tower's last hidden state for square images, without CLIP's class token; SigLIP2 gets
    the patches of its own image processor."""
    if model.config.model_type == "siglip2_vision_model":
        from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

        p = model.config.patch_size
        grid = images.shape[-1] // p
        patches = [torch.from_numpy(convert_image_to_patches(i.numpy(), p)) for i in images]
        inputs = dict(pixel_values=torch.stack(patches),
                      pixel_attention_mask=torch.ones(len(images), grid * grid, dtype=torch.long),
                      spatial_shapes=torch.tensor([[grid, grid]] * len(images)))
    else:
        inputs = dict(pixel_values=images)
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    return hidden[:, 1:] if model.config.model_type == "clip_vision_model" else hidden


@pytest.mark.parametrize("name", ENCODERS)
def test_vision_encoder_import_equals_the_original(sources, towers, tmp_path, name):
    """CLIP ViT with GELU (LAION and DFN ViT-H) or QuickGELU (OpenAI), SigLIP and SigLIP2 (NaFlex):
    the imported encoder's patch features equal the tower's last hidden state (without CLIP's class
    token), from transformers 5's config.json and from 4.x's; the MM1 export writes the same class
    back, and its logits with images equal megatron's."""
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.megatron_io import MegatronCheckpoint
    from megatron_mm1.hf.verify import megatron_model, verify

    tower, folder, fixture = towers[name]
    tower4 = edited_copy(folder, tmp_path / "tower4")  # the same weights, 4.x's config.json
    shutil.copy(HF4 / f"{name}.json", tower4 / "config.json")
    ckpt, old = (import_mm1(sources, v, tmp_path / f"ckpt{i}") for i, v in enumerate((folder, tower4)))
    reader = MegatronCheckpoint(ckpt)
    assert reader.cfg.model.vision.hf_model_type == fixture["model_type"]
    assert reader.cfg.model.vision.activation == fixture["hidden_act"]
    assert MegatronCheckpoint(old).cfg == reader.cfg
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = encoder_features(tower, images)
        features = megatron_model(reader).vision(images)
    assert reference.shape == features.shape and (reference - features).abs().max() < 1e-4
    exported = to_hf(ckpt, tmp_path / "mm1", progress=False)
    assert json.loads((exported / "config.json").read_text())["vision_config"]["model_type"] == fixture["model_type"]
    metrics = verify(ckpt, exported)
    assert metrics["max_abs_diff"] < MAX_ABS_DIFF and metrics["top1_agreement"] == 1.0, metrics


# Keys transformers 4.x wrote into every sub-config (generation settings and the like); none
# changes an encoder's maths.
LEGACY_SUBCONFIG_KEYS = dict(do_sample=False, num_beams=1, top_k=50, temperature=1.0, is_decoder=False,
                             add_cross_attention=False, chunk_size_feed_forward=0, pruned_heads={}, torchscript=False)


def test_composite_vision_folders_and_refusals(sources, towers, tmp_path):
    """A SiglipModel or Siglip2Model folder (text tower beside the vision one, 4.x's legacy
    sub-config keys) imports the same encoder as the bare tower; an image size with a remainder
    after whole patches computes as SigLIP does; a key that changes the maths, pruned heads, or a
    tensor the architecture does not have are refused by name."""
    from safetensors.torch import load_file, save_file

    from megatron_mm1.config import ConfigError
    from megatron_mm1.hf.megatron_io import MegatronCheckpoint
    from megatron_mm1.hf.verify import megatron_model

    for name in ("siglip", "siglip2"):
        _, folder, fixture = towers[name]
        composite = tmp_path / f"{name}_model"
        composite.mkdir()
        weights = {"vision_model." + k: v for k, v in load_file(folder / "model.safetensors").items()}
        weights.update({"text_model.embeddings.token_embedding.weight": torch.ones(8, 4),
                        "logit_scale": torch.ones(1), "logit_bias": torch.ones(1)})
        save_file(weights, composite / "model.safetensors", metadata={"format": "pt"})
        (composite / "config.json").write_text(json.dumps({
            "model_type": name, "initializer_factor": 1.0, "text_config": {"hidden_size": 4},
            "vision_config": {**fixture, **LEGACY_SUBCONFIG_KEYS}}))
        a = stored_tensors(import_mm1(sources, folder, tmp_path / f"{name}_bare"))
        b = stored_tensors(import_mm1(sources, composite, tmp_path / f"{name}_composite"))
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("vision."))

    def refused_vision(vision: Path, message: str) -> None:
        with pytest.raises(ConfigError) as error:
            import_mm1(sources, vision, tmp_path / "out")
        assert message in str(error.value), str(error.value)
        assert not (tmp_path / "out").exists()

    # SigLIP-so400m's 384 px over 14 px patches leaves a remainder, which the patch convolution
    # cuts off; here 60 px, a 4 x 4 grid as at 56.
    tower, folder, _ = towers["siglip"]
    reader = MegatronCheckpoint(import_mm1(sources, edited_copy(folder, tmp_path / "s60", {"image_size": 60}),
                                           tmp_path / "ckpt60"))
    assert reader.cfg.model.vision.image_size == 60 and reader.cfg.model.vision.num_patches == 16
    images = torch.randn(2, 3, 60, 60, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (encoder_features(tower, images) - megatron_model(reader).vision(images)).abs().max() < 1e-4

    refused_vision(edited_copy(folder, tmp_path / "a", {"layer_scale_init_value": 0.1}),
                   "layer_scale_init_value=0.1: not understood")
    refused_vision(edited_copy(folder, tmp_path / "b", {"pruned_heads": {"0": [1]}}), "pruned_heads=")
    refused_vision(edited_copy(folder, tmp_path / "c", tensors=lambda w: w.update(
        {"embeddings.class_embedding": torch.ones(64)})), "would not read: embeddings.class_embedding")


def test_tied_embeddings_in_the_mm1_export(sources, tmp_path):
    """The full MM1 export (remote code around the native LM) keeps a tied LM tied: its logits
    with images equal megatron's."""
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.verify import verify

    ckpt = import_llm(sources["llama3"][1], tmp_path / "ckpt")
    metrics = verify(ckpt, to_hf(ckpt, tmp_path / "mm1", progress=False))
    assert metrics["max_abs_diff"] < MAX_ABS_DIFF and metrics["top1_agreement"] == 1.0, metrics
