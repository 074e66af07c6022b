"""Layer specs (megatron-core's ModuleSpec pattern): which implementation builds each layer.

`local` uses megatron-core's own parallel linears and attention with torch norms. The torch
norms here mark their parameters `sequence_parallel` so megatron-core's finalize_model_grads
all-reduces their gradients across TP; megatron's own WrappedTorchNorm refuses sequence
parallelism, and apex/TransformerEngine are not assumed.

`fast` swaps these, each of which computes less, keeps less for backward or runs fewer kernels:
- the core attention runs through torch's fused kernels (SDPAttention, models/attention.py),
  by packed sample: the decoder gets the samples' boundaries, not a [b, 1, s, s] mask, and
  computes only the causal blocks inside each sample (varlen flash attention on GPU, one
  fused SDPA call per sample on CPU), where megatron's baddbmm -> softmax -> bmm computes every
  block of the row and keeps the [b, heads, s, s] probabilities twice (fp32 and bf16);
- RMSNorm is compiled (CompiledRMSNorm): one kernel that keeps the input and an fp32 rstd, on
  every device (eager CPU keeps two fp32 copies of the input; CUDA has a fused eager kernel);
- SwiGLU is megatron's own fused one (SWIGLU_FUSION: a torch.compile'd autograd function that
  keeps only its input; eager keeps three more [tokens, ffn] tensors);
- the vision encoder's QuickGELU is megatron's compiled one (QUICK_GELU; `local` runs it eagerly
  and so never starts torch.compile, whose first use costs seconds in every process);
- a MoE layer's experts are two grouped GEMMs over all local experts (TorchGroupedMLP,
  models/experts.py: torch._grouped_mm on stacked weights, SequentialMLP's checkpoint keys)
  instead of megatron's SequentialMLP, which runs one expert after another.
LayerNorm (the vision encoder's) is one fused kernel in eager torch already.

`te` is megatron-core's Transformer Engine layers, packed as THD (models/te_spec.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
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

from megatron_mm1.models import te_spec
from megatron_mm1.models.attention import SDPAttention, dense_mask_inputs, segment_inputs, thd_inputs
from megatron_mm1.models.experts import EXPERTS


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
SWIGLU_FUSION = {"local": False, "fast": True, "te": True}


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


QUICK_GELU = {"local": eager_quick_gelu, "fast": quick_gelu, "te": quick_gelu}


# What differs between the `local` and `fast` layers: which modules compute softmax(QK^T)V and
# the norms, and the decoder's mask type: `arbitrary` for a dense mask (which rules out fused
# kernels), `causal` within each packed sample.
CORE_ATTENTION = {"local": DotProductAttention, "fast": SDPAttention}
NORM = {"local": TorchNorm, "fast": CompiledNorm}
DECODER_MASK = {"local": AttnMaskType.arbitrary, "fast": AttnMaskType.causal}

# How each spec's decoder learns where the packed samples are (models/attention.py): a dense
# [b, 1, s, s] mask, their boundaries in the [s, b] rows, or in the rows flattened to one
# (THD, which MM1Model and the pipeline's tensor shapes follow).
PACKING = {"local": "mask", "fast": "sbhd", "te": "thd"}
ATTENTION_INPUTS = {"mask": dense_mask_inputs, "sbhd": segment_inputs, "thd": thd_inputs}


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
    dense, moe = te_spec.decoder_layer_specs(config) if kind == "te" else _decoder_layer_specs(config, kind)
    layer_specs = [dense] * config.num_layers
    if moe is not None:
        layer_specs = [
            moe if i % config.moe_layer_freq == 0 else dense for i in range(config.num_layers)
        ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    final_norm = te_spec.final_norm() if kind == "te" else NORM[kind]
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset : offset + count], layer_norm=final_norm)


def _decoder_layer_specs(config: TransformerConfig, kind: str) -> tuple[ModuleSpec, ModuleSpec | None]:
    """`local` or `fast`: the dense layer and (MoE models) the MoE layer."""
    backend = LocalSpecProvider()
    dense_mlp = get_mlp_module_spec_for_backend(backend, num_experts=None)
    dense = _layer_spec(dense_mlp, DECODER_MASK[kind], config.qk_layernorm, kind)
    if not config.num_moe_experts:
        return dense, None
    moe_mlp = get_mlp_module_spec_for_backend(backend, num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    moe_mlp.submodules.experts.module = EXPERTS[kind]  # SequentialMLP or grouped GEMMs
    return dense, _layer_spec(moe_mlp, DECODER_MASK[kind], config.qk_layernorm, kind)


def vision_layer_spec(kind: str = "local") -> ModuleSpec:
    """A CLIP ViT layer: pre-LN, bidirectional attention, biased linears (QuickGELU via config)."""
    if kind == "te":
        return te_spec.vision_layer_spec()
    mlp = get_mlp_module_spec_for_backend(LocalSpecProvider(), num_experts=None)
    return _layer_spec(mlp, AttnMaskType.no_mask, qk_norm=False, kind=kind)
