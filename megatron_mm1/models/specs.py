"""Layer specs (megatron-core's ModuleSpec pattern): which implementation builds each layer.

`local` uses megatron-core's own parallel linears and attention with torch norms. The torch
norms here mark their parameters `sequence_parallel` so megatron-core's finalize_model_grads
all-reduces their gradients across TP; megatron's own WrappedTorchNorm refuses sequence
parallelism, and apex/TransformerEngine are not assumed.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)


class TorchNorm:
    """torch.nn.LayerNorm or RMSNorm (per config.normalization) that supports sequence parallel."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            # Under SP each TP rank sees a slice of the sequence: grads need a TP all-reduce.
            p.sequence_parallel = config.sequence_parallel
        return norm


def _layer_spec(mlp: ModuleSpec, attn_mask_type: AttnMaskType, qk_norm: bool) -> ModuleSpec:
    qk = TorchNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                # `arbitrary`: the model always passes its block-diagonal causal mask for packed
                # samples; `causal` would let fused kernels ignore it.
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def llm_block_spec(
    config: TransformerConfig, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The decoder layers built on this pipeline stage: dense, or MoE every `moe_layer_freq`."""
    backend = LocalSpecProvider()
    dense = _layer_spec(
        get_mlp_module_spec_for_backend(backend, num_experts=None),
        AttnMaskType.arbitrary,
        config.qk_layernorm,
    )
    layer_specs = [dense] * config.num_layers
    if config.num_moe_experts:
        moe = _layer_spec(
            get_mlp_module_spec_for_backend(
                backend, num_experts=config.num_moe_experts, moe_grouped_gemm=False
            ),
            AttnMaskType.arbitrary,
            config.qk_layernorm,
        )
        layer_specs = [
            moe if i % config.moe_layer_freq == 0 else dense for i in range(config.num_layers)
        ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + count], layer_norm=TorchNorm
    )


def vision_layer_spec() -> ModuleSpec:
    """A CLIP ViT layer: pre-LN, bidirectional attention, biased linears (QuickGELU via config)."""
    mlp = get_mlp_module_spec_for_backend(LocalSpecProvider(), num_experts=None)
    return _layer_spec(mlp, AttnMaskType.no_mask, qk_norm=False)
