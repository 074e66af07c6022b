"""`model.layer_spec=te`: megatron-core's Transformer Engine layers, where TE is installed.

The layers are megatron-core's own TE specs (`get_gpt_layer_with_transformer_engine_spec`,
`get_vit_layer_with_transformer_engine_spec`): fused norm + linear, cuDNN/flash attention over
THD-packed samples (models/attention.py, `thd_segments`), TE's fused rotary embedding and
grouped-GEMM experts (TEGroupedMLP). TE imports CUDA libraries, so everything here imports it
late, and `check_runs` refuses the spec, by name, before start-up where it cannot run.

Checkpoints: TE fuses the pre-attention and pre-MLP norms into the next linear, whose weight
then sits at `linear_qkv.layer_norm_weight`. NORM_KEYS saves it under the `local` spec's name
(`input_layernorm.weight`), as megatron's local spec does the reverse, so a checkpoint moves
between the specs and `mm1 convert` reads it with the `local` layers. TEGroupedMLP's shards are
SequentialMLP's by megatron's design. TE's `_extra_state` (FP8 scaling factors; this project
trains in bf16) is not saved (checkpoint.model_sharded_state_dict).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional

import torch

from megatron_mm1.config import Config, ConfigError

if TYPE_CHECKING:  # the launchers check the spec without importing megatron-core
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

# Fused norm weights saved under the names of the `local` spec's own norm modules.
NORM_KEYS = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def unavailable() -> Optional[str]:
    """Why the TE layers cannot run on this machine, or None."""
    if not torch.cuda.is_available():
        return "Transformer Engine runs on CUDA and this machine has no GPU"
    try:  # TE itself, and megatron-core's layers on it
        for module in ("transformer_engine.pytorch", "megatron.core.extensions.transformer_engine_spec_provider"):
            importlib.import_module(module)
    except (ImportError, OSError) as e:  # OSError: TE's CUDA libraries do not load
        return f"transformer_engine does not import ({type(e).__name__}: {e})"
    return None


def check_runs(cfg: Config) -> None:
    """Refuse `te` where it cannot run, before any process group or device memory."""
    reason = unavailable() if cfg.model.layer_spec == "te" else None
    if reason:
        raise ConfigError(
            f"model.layer_spec=te: {reason}. Install Transformer Engine on the GPU nodes "
            "(pip install --no-build-isolation 'transformer_engine[pytorch]') or set model.layer_spec=fast, "
            "which packs samples the same way with torch's kernels"
        )


def _saving_norms_as_local(spec: ModuleSpec) -> ModuleSpec:
    spec.submodules.sharded_state_dict_keys_map = dict(NORM_KEYS)
    return spec


def decoder_layer_specs(config: TransformerConfig) -> tuple[ModuleSpec, Optional[ModuleSpec]]:
    """The decoder's dense layer and (MoE models) its MoE layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    dense = _saving_norms_as_local(get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm))
    if not config.num_moe_experts:
        return dense, None
    moe = get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=True, qk_layernorm=config.qk_layernorm
    )
    return dense, _saving_norms_as_local(moe)


def final_norm() -> type:
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def vision_layer_spec() -> ModuleSpec:
    """A ViT layer (bidirectional attention, no packing)."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

    return _saving_norms_as_local(get_vit_layer_with_transformer_engine_spec())
