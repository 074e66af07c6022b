"""Layer specs (megatron-core's ModuleSpec pattern): which implementation builds each layer.

`local` uses megatron-core's own parallel linears and attention with torch norms. The torch
norms here mark their parameters `sequence_parallel` so megatron-core's finalize_model_grads
all-reduces their gradients across TP; megatron's own WrappedTorchNorm refuses sequence
parallelism, and apex/TransformerEngine are not assumed.

`fast` swaps three things, each of which keeps less for backward and runs fewer kernels:
- the core attention runs through torch.nn.functional.scaled_dot_product_attention
  (SDPAttention): a fused kernel (flash or memory-efficient on GPU, a fused CPU kernel
  otherwise) instead of megatron's baddbmm -> softmax -> bmm, which keeps the [b, heads, s, s]
  probabilities twice (fp32 and bf16);
- RMSNorm is compiled (CompiledRMSNorm): one kernel that keeps the input and an fp32 rstd, on
  every device (eager CPU keeps two fp32 copies of the input; CUDA has a fused eager kernel);
- SwiGLU is megatron's own fused one (SWIGLU_FUSION: a torch.compile'd autograd function that
  keeps only its input; eager keeps three more [tokens, ffn] tensors);
- the vision encoder's QuickGELU is megatron's compiled one (QUICK_GELU; `local` runs it eagerly
  and so never starts torch.compile, whose first use costs seconds in every process).
LayerNorm (the vision encoder's) is one fused kernel in eager torch already.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.activations import quick_gelu
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
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


@torch.compile
def _compiled_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


class CompiledRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm (same parameters and results) whose forward is compiled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_rms_norm(x, self.weight, self.eps)


class TorchNorm:
    """torch.nn.LayerNorm or RMSNorm (per config.normalization) that supports sequence parallel."""

    rms_norm = torch.nn.RMSNorm

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        norm_cls = cls.rms_norm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            # Under SP each TP rank sees a slice of the sequence: grads need a TP all-reduce.
            p.sequence_parallel = config.sequence_parallel
        return norm


class CompiledNorm(TorchNorm):
    """TorchNorm with RMSNorm compiled."""

    rms_norm = CompiledRMSNorm


# Megatron's fused SwiGLU (`bias_activation_fusion`): a torch.compile'd autograd function that
# keeps only its input for backward.
SWIGLU_FUSION = {"local": False, "fast": True}


class _QuickGELU(torch.autograd.Function):
    """OpenAI CLIP's QuickGELU, x * sigmoid(1.702 x), uncompiled. Keeps only its input for
    backward, as megatron-core's compiled `quick_gelu` does (eager autograd would keep the
    sigmoid too: one more [tokens, ffn] tensor per ViT layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))


def eager_quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return _QuickGELU.apply(x)


QUICK_GELU = {"local": eager_quick_gelu, "fast": quick_gelu}


def sdpa_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron's boolean mask (True = masked) as SDPA's additive one, made once per mask.

    Every layer gets the same mask object; SDPA would convert a boolean mask in each layer and
    each layer would keep its own [b, 1, s, s] copy for backward."""
    global _last_mask
    if _last_mask is None or _last_mask[0] is not attention_mask or _last_mask[1].dtype != dtype:
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        _last_mask = (attention_mask, additive.masked_fill_(attention_mask, float("-inf")))
    return _last_mask[1]


_last_mask: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class SDPAttention(MegatronModule):
    """Core attention through F.scaled_dot_product_attention; a drop-in for megatron-core's
    DotProductAttention (same constructor and forward, same [s, b, heads, dim] -> [s, b, h])."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        assert config.context_parallel_size == 1, "SDPAttention has no context parallelism"
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        # None: SDPA's own 1/sqrt(head_dim), as DotProductAttention. (Megatron's query-key layer
        # scaling divides the scores by the layer number and multiplies them back in the fp32
        # softmax, a no-op on the result, so it needs no counterpart here.)
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        assert attention_bias is None and packed_seq_params is None
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        mask_type = attn_mask_type or self.attn_mask_type
        no_mask = mask_type == AttnMaskType.no_mask or attention_mask is None
        mask = None if no_mask else sdpa_mask(attention_mask, q.dtype)
        dropout = self.dropout if self.training else 0.0
        # Heads differ across TP ranks, so their dropout draws come from the model-parallel RNG.
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask_type == AttnMaskType.causal,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],  # K/V stay at their query-group count
            )
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


# What differs between the specs' layers: which modules compute softmax(QK^T)V and the norms.
CORE_ATTENTION = {"local": DotProductAttention, "fast": SDPAttention}
NORM = {"local": TorchNorm, "fast": CompiledNorm}


def _layer_spec(
    mlp: ModuleSpec, attn_mask_type: AttnMaskType, qk_norm: bool, kind: str
) -> ModuleSpec:
    qk = NORM[kind] if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=NORM[kind],
            self_attention=ModuleSpec(
                module=SelfAttention,
                # `arbitrary`: the model always passes its block-diagonal causal mask for packed
                # samples; `causal` would let fused kernels ignore it.
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=CORE_ATTENTION[kind],
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=NORM[kind],
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def llm_block_spec(
    config: TransformerConfig, vp_stage: int | None = None, kind: str = "local"
) -> TransformerBlockSubmodules:
    """The decoder layers built on this pipeline stage: dense, or MoE every `moe_layer_freq`."""
    backend = LocalSpecProvider()
    dense = _layer_spec(
        get_mlp_module_spec_for_backend(backend, num_experts=None),
        AttnMaskType.arbitrary,
        config.qk_layernorm,
        kind,
    )
    layer_specs = [dense] * config.num_layers
    if config.num_moe_experts:
        moe = _layer_spec(
            get_mlp_module_spec_for_backend(
                backend, num_experts=config.num_moe_experts, moe_grouped_gemm=False
            ),
            AttnMaskType.arbitrary,
            config.qk_layernorm,
            kind,
        )
        layer_specs = [
            moe if i % config.moe_layer_freq == 0 else dense for i in range(config.num_layers)
        ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + count], layer_norm=NORM[kind]
    )


def vision_layer_spec(kind: str = "local") -> ModuleSpec:
    """A CLIP ViT layer: pre-LN, bidirectional attention, biased linears (QuickGELU via config)."""
    mlp = get_mlp_module_spec_for_backend(LocalSpecProvider(), num_experts=None)
    return _layer_spec(mlp, AttnMaskType.no_mask, qk_norm=False, kind=kind)
