"""Writes tests/data/hf4/<name>.json: config.json files of tiny models exactly as transformers 4.x
wrote them (top-level rope_theta/rope_scaling, no rope_parameters, 4.x-only keys), so the Hugging Face
importer is tested against the old layout as well as the transformers-5 one. Configs only, no weights.

Runs under transformers 4.x only, installed beside the project venv without touching it:

  .venv/bin/pip download transformers==4.55.4 --no-deps -d /tmp/tf4whl
  .venv/bin/pip install --no-deps --target /tmp/tf4 /tmp/tf4whl/transformers-*.whl \
      requests urllib3 certifi charset_normalizer "huggingface_hub==0.36.0" "tokenizers==0.21.4"
  PYTHONPATH=/tmp/tf4 .venv/bin/python tools/make_hf4_fixtures.py [OUT_DIR]
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import tempfile
from pathlib import Path

import transformers
from transformers import (CLIPVisionConfig, LlamaConfig, MistralConfig, MixtralConfig, PretrainedConfig,
                          Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig, SiglipVisionConfig)

assert transformers.__version__.startswith("4."), f"run under transformers 4.x, not {transformers.__version__}"

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "tests" / "data" / "hf4"

TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, torch_dtype="float32",
            bos_token_id=1, eos_token_id=2)
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, torch_dtype="float32")

CONFIGS = {
    "llama3": (LlamaConfig, dict(TEXT, rope_theta=500000.0, tie_word_embeddings=True, head_dim=16, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama_linear": (LlamaConfig, dict(TEXT, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})),
    # factor 4 though max_position_embeddings / original_max_position_embeddings is 8 (4.55 computes
    # with the ratio, 4.56 and 5 with the factor).
    "llama_yarn": (LlamaConfig, dict(TEXT, rope_theta=10000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (MistralConfig, dict(TEXT, sliding_window=None, head_dim=32, rope_theta=1000000.0)),
    # Mixtral has no moe_intermediate_size: its experts use intermediate_size.
    "mixtral": (MixtralConfig, dict(TEXT, sliding_window=None, num_local_experts=4, num_experts_per_tok=2,
                                    intermediate_size=32, rope_theta=1000000.0)),
    # Qwen2.5's long-context YaRN setting, with the factor equal to max_position_embeddings /
    # original_max_position_embeddings (which transformers up to 4.55 used instead of the factor).
    "qwen2": (Qwen2Config, dict(TEXT, rope_theta=1000000.0, tie_word_embeddings=True, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen2_moe": (Qwen2MoeConfig, dict(TEXT, **QWEN_MOE, shared_expert_intermediate_size=0, decoder_sparse_step=1,
                                       mlp_only_layers=[1])),
    "qwen3": (Qwen3Config, dict(TEXT, head_dim=16, rope_theta=1000000.0)),
    "qwen3_sliding": (Qwen3Config, dict(TEXT, head_dim=16, use_sliding_window=True, sliding_window=32,
                                        max_window_layers=1)),
    # Qwen3MoeConfig 4.x has no head_dim argument; like the hub configs, it is kept as an extra attribute.
    "qwen3_moe": (Qwen3MoeConfig, dict(TEXT, **QWEN_MOE, head_dim=32, mlp_only_layers=[], decoder_sparse_step=1)),
    "clip_gelu": (CLIPVisionConfig, dict(VISION, image_size=56, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)),
    "clip_quick_gelu": (CLIPVisionConfig, dict(VISION, image_size=56, patch_size=14, hidden_act="quick_gelu",
                                               layer_norm_eps=1e-5)),
    "siglip": (SiglipVisionConfig, dict(VISION, image_size=56, patch_size=14)),
}
if hasattr(transformers, "Siglip2VisionConfig"):
    CONFIGS["siglip2"] = (transformers.Siglip2VisionConfig, dict(VISION, patch_size=14, num_patches=16))

# Keys dropped from the written file. Qwen2-MoE q/k/v were always biased; the qkv_bias key only came with
# transformers PR #36735 (March 2025), so the Qwen1.5/Qwen2 MoE hub configs lack it (4.57.1 writes true).
DROP = {"qwen2_moe": ("qkv_bias",)}


def extra_kwargs(cls: type, kwargs: dict) -> list[str]:
    """Keyword arguments that are neither __init__ arguments of cls nor PretrainedConfig attributes."""
    known = set(inspect.signature(cls.__init__).parameters) | set(vars(PretrainedConfig())) | {"torch_dtype"}
    return sorted(set(kwargs) - known)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (cls, kwargs) in CONFIGS.items():
        if extra := extra_kwargs(cls, kwargs):
            print(f"{name}: {cls.__name__} has no __init__ argument {extra}, stored as extra attributes")
        with tempfile.TemporaryDirectory() as tmp:
            cls(**kwargs).save_pretrained(tmp)
            shutil.copyfile(Path(tmp) / "config.json", OUT / f"{name}.json")
        if name in DROP:
            data = json.loads((OUT / f"{name}.json").read_text())
            for key in DROP[name]:
                data.pop(key, None)
            (OUT / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote {OUT / f'{name}.json'}")


if __name__ == "__main__":
    main()
