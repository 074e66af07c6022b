"""The MM1 model: images -> CLIP ViT -> connector -> image tokens placed at `<image>` positions
of a megatron-core GPT decoder.

The vision side lives on the first pipeline stage (first virtual chunk) only. The loss covers
text targets only. One instance is one pipeline model chunk; `build_model` returns this rank's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_find_correction_range,
    _yarn_linear_ramp_mask,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mm1 import cpu_compat
from megatron_mm1.config import Config
from megatron_mm1.device import check_placement, device
from megatron_mm1.models.connector import build_connector
from megatron_mm1.models.specs import ATTENTION_INPUTS, PACKING, QUICK_GELU, SWIGLU_FUSION, llm_block_spec
from megatron_mm1.models.vision import VisionEncoder


def _recompute(mode: str) -> dict:
    """Activation recomputation: selective re-runs the attention core, full whole layers."""
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def _common_config(cfg: Config) -> dict:
    p, t = cfg.parallel, cfg.training
    # megatron's layers allocate and initialise on the device (torch.cuda.current_device()),
    # except on the meta device (layouts, parameter counts): there they must allocate without
    # a device of their own, which their CPU-initialisation path does.
    on_meta = torch.get_default_device().type == "meta"
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    return dict(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        bf16=t.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.model.init_method_std,
        use_cpu_initialization=on_meta,
        perform_initialization=not on_meta,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        # TE's fused rotary embedding; megatron's other fusions need apex or CUDA-only kernels.
        apply_rope_fusion=cfg.model.layer_spec == "te",
        gradient_accumulation_fusion=False,
        **cpu_compat.transformer_config_overrides(),
    )


def llm_transformer_config(cfg: Config) -> TransformerConfig:
    llm, moe, p = cfg.model.llm, cfg.model.moe, cfg.parallel
    extra = {}
    if moe.num_experts:
        extra = dict(
            num_moe_experts=moe.num_experts,
            moe_layer_freq=moe.layer_freq,
            moe_ffn_hidden_size=moe.ffn_hidden_size or llm.ffn_hidden_size,
            moe_router_topk=moe.router_topk,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_pad_expert_input_to_capacity=False,
            moe_token_dispatcher_type=moe.token_dispatcher,
            moe_grouped_gemm=cfg.model.layer_spec == "te",  # TEGroupedMLP; `fast` sets its own experts
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        **_common_config(cfg),
        **extra,
        **_recompute(cfg.training.recompute_llm),
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.ffn_hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        kv_channels=llm.head_dim,
        add_qkv_bias=llm.qkv_bias,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_epsilon,
        qk_layernorm=llm.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=SWIGLU_FUSION[cfg.model.layer_spec],
        add_bias_linear=False,
        softmax_scale=_softmax_scale(cfg),
    )


def _softmax_scale(cfg: Config) -> float | None:
    """YaRN scales cos and sin by its attention factor m, so q.k by m^2: megatron's rotary
    embedding has no such factor and the attention's softmax scale takes it (None: megatron's
    own 1/sqrt(head_dim))."""
    llm = cfg.model.llm
    if llm.rope_scaling.type != "yarn":
        return None
    return llm.rope_scaling.attention_scale**2 / math.sqrt(llm.head_dim)


def vision_transformer_config(cfg: Config) -> TransformerConfig:
    v = cfg.model.vision
    return TransformerConfig(
        **_common_config(cfg),
        **_recompute(cfg.training.recompute_vision),
        # The encoder is not pipelined and its sequence (patches, CLIP's class token) is not split.
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        num_layers=v.num_layers_used,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.layernorm_epsilon,
        gated_linear_unit=False,
        activation_func=vision_activations(cfg.model.layer_spec)[v.activation],
        add_bias_linear=True,
        add_qkv_bias=True,
    )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def vision_activations(layer_spec: str) -> dict:
    """The ViT MLP's activations (model.vision.activation) under `layer_spec`: OpenAI CLIP's
    QuickGELU, the exact (erf) GELU of the LAION and DFN encoders, or SigLIP's tanh approximation."""
    return {"quick_gelu": QUICK_GELU[layer_spec], "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh}


def rope_options(cfg: Config) -> dict:
    """GPTModel's position-embedding arguments for model.llm.rope_scaling (llama3 and yarn are
    applied after construction, by `_apply_llama3_scaling` and `_apply_yarn_scaling`; dynamic is
    the default RoPE at every length MM1 runs)."""
    rope = cfg.model.llm.rope_scaling
    factor = rope.factor if rope.type == "linear" else None
    return dict(position_embedding_type="rope", seq_len_interpolation_factor=factor)


def _apply_llama3_scaling(rope: RotaryEmbedding, cfg: Config) -> None:
    """Llama 3.1's RoPE scaling with every parameter of the source (GPTModel passes only the
    factor to megatron's own `_apply_scaling`, fixing the rest at Llama 3.1's values)."""
    r = cfg.model.llm.rope_scaling
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq, factor=r.factor, low_freq_factor=r.low_freq_factor,
        high_freq_factor=r.high_freq_factor,
        original_max_position_embeddings=r.original_max_position_embeddings,
    )


def _apply_yarn_scaling(rope: RotaryEmbedding, cfg: Config) -> None:
    """transformers' YaRN frequencies, computed as it does, in megatron's plain rotary embedding;
    the attention factor is in the softmax scale (`_softmax_scale`). Not megatron's own 'yarn'
    embedding: it reads yarn_* attributes TransformerConfig lacks, has no explicit attention
    factor and counts an mscale that transformers ignores without mscale_all_dim."""
    llm = cfg.model.llm
    r, dim, device = llm.rope_scaling, llm.head_dim, rope.inv_freq.device
    powers = float(llm.rotary_base) ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    low, high = _yarn_find_correction_range(
        r.beta_fast, r.beta_slow, dim, llm.rotary_base, r.original_max_position_embeddings, r.truncate
    )
    # 1 keeps a dimension's original frequency (extrapolation), 0 divides it by the factor.
    keep = 1 - _yarn_linear_ramp_mask(low, high, dim // 2, device=device)
    rope.inv_freq = 1.0 / (r.factor * powers) * (1 - keep) + 1.0 / powers * keep


@dataclass
class MM1Output:
    """Last-stage output: per-token losses [b, s] before masking."""

    lm_loss: torch.Tensor
    z_loss: Optional[torch.Tensor]


def vision_encoder(cfg: Config) -> VisionEncoder:
    return VisionEncoder(vision_transformer_config(cfg), cfg.model.vision, cfg.model.layer_spec)


def image_connector(cfg: Config) -> torch.nn.Module:
    m = cfg.model
    connector = build_connector(m.connector, m.vision.num_patches, m.vision.hidden_size, m.llm.hidden_size)
    return connector.to(llm_transformer_config(cfg).params_dtype)


class MM1Model(MegatronModule):
    def __init__(
        self,
        cfg: Config,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ) -> None:
        llm_config = llm_transformer_config(cfg)
        super().__init__(config=llm_config)
        m = cfg.model
        self.image_token_id = m.image_token_id
        self.z_loss_coeff = m.logits_z_loss_coeff
        self.vocab_size = m.llm.vocab_size  # the true one; the layers hold padded_vocab_size rows
        self.pre_process = pre_process
        self.post_process = post_process
        self.packing = PACKING[m.layer_spec]
        self.sequence_parallel = llm_config.sequence_parallel
        self.model_type = ModelType.encoder_or_decoder
        # Read by megatron's finalize_model_grads, which all-reduces a tied embedding's gradient
        # between the first and the last pipeline stage.
        self.share_embeddings_and_output_weights = m.llm.tie_embeddings
        self.vision = self.connector = None
        if pre_process:
            self.vision, self.connector = vision_encoder(cfg), image_connector(cfg)
        self.llm = GPTModel(
            config=llm_config,
            transformer_layer_spec=llm_block_spec(llm_config, vp_stage=vp_stage, kind=m.layer_spec),
            vocab_size=m.llm.padded_vocab_size,
            max_sequence_length=m.llm.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=m.llm.tie_embeddings,
            rotary_base=m.llm.rotary_base,
            vp_stage=vp_stage,
            **rope_options(cfg),
        )
        if m.llm.rope_scaling.type == "llama3":
            _apply_llama3_scaling(self.llm.rotary_pos_emb, cfg)
        if m.llm.rope_scaling.type == "yarn":
            _apply_yarn_scaling(self.llm.rotary_pos_emb, cfg)
        for module, frozen in (
            (self.vision, m.freeze_vision),
            (self.connector, m.freeze_connector),
            (self.llm, m.freeze_llm),
        ):
            if module is not None and frozen:
                module.requires_grad_(False)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.llm.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def embed(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Text embeddings with image tokens placed at the `<image>` positions: [s(/tp), b, h]."""
        text = self.llm.embedding(input_ids=tokens, position_ids=None)  # [s(/tp), b, h]
        is_image = tokens == self.image_token_id  # [b, s]
        n_slots = int(is_image.sum())
        if images.shape[0] == 0:
            if n_slots:
                raise ValueError(f"{n_slots} <image> tokens in the batch but no images")
            # Keep the vision parameters in the graph so data-parallel gradient reduction sees
            # every parameter, with zero gradient, on steps without images.
            dummy = sum(p.sum() for p in self.vision_parameters() if p.requires_grad)
            return text + 0.0 * dummy
        image_tokens = self.connector(self.vision(images))  # [n_img, N, h]
        if image_tokens.shape[0] * image_tokens.shape[1] != n_slots:
            raise ValueError(
                f"{images.shape[0]} images need {image_tokens.numel() // image_tokens.shape[-1]} "
                f"<image> tokens but the batch has {n_slots}"
            )
        b, s = tokens.shape
        placed = text.new_zeros(b, s, text.shape[-1]).masked_scatter(
            is_image.unsqueeze(-1), image_tokens.to(text.dtype)
        )
        placed = placed.transpose(0, 1).contiguous()  # [s, b, h]
        mask = is_image.transpose(0, 1).unsqueeze(-1)
        if self.sequence_parallel:
            placed = tensor_parallel.scatter_to_sequence_parallel_region(placed)
            rank = parallel_state.get_tensor_model_parallel_rank()
            mask = mask.chunk(parallel_state.get_tensor_model_parallel_world_size())[rank]
        # Contiguous: the layout carries through the layers to the pipeline's send buffers.
        return torch.where(mask, placed, text).contiguous()

    def vision_parameters(self):
        for module in (self.vision, self.connector):
            if module is not None:
                yield from module.parameters()

    def forward(
        self,
        tokens: torch.Tensor,
        segment_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ):
        """First stage: embed tokens and images. Last stage: per-token losses (or logits when
        `labels` is None). Other stages: hidden states for the next stage. `segment_ids` [b, s]
        says where the packed samples are (the batch contract's); the layer spec decides how
        attention receives them. THD packing runs the rows as one of b*s tokens (hidden states
        between stages [b*s(/tp), 1, h]) and returns losses and logits in the [b, s] rows."""
        attention_inputs = ATTENTION_INPUTS[self.packing](segment_ids)
        rows = tokens.shape
        if self.packing == "thd":
            tokens = tokens.reshape(1, -1)
            labels = None if labels is None else labels.reshape(1, -1)
        decoder_input = self.embed(tokens, images) if self.pre_process else None
        out = self.llm(input_ids=tokens, position_ids=None, decoder_input=decoder_input, **attention_inputs)
        if not self.post_process:
            return out
        mask_vocab_padding(out, self.vocab_size)
        if labels is None:
            return out.view(*rows, out.shape[-1])
        logits = out.float()  # [b, s, v/tp]
        z_loss = None
        if self.z_loss_coeff:
            z_loss = self.z_loss_coeff * vocab_parallel_logsumexp(logits).square()
        # vocab_parallel_cross_entropy works in place on its input; z-loss is computed first.
        lm_loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
        # No loss on image targets, whatever the loss mask says.
        lm_loss = lm_loss.masked_fill(labels == self.image_token_id, 0.0)
        return MM1Output(lm_loss=lm_loss.view(rows), z_loss=None if z_loss is None else z_loss.view(rows))


def pipeline_shape(cfg: Config, seq_length: int, micro_batch_size: int) -> dict:
    """forward_backward_func's `seq_length` and `micro_batch_size`, the [s, b] of the hidden
    states that pipeline stages exchange: THD packing sends a micro-batch's rows as one."""
    if PACKING[cfg.model.layer_spec] == "thd":
        return dict(seq_length=seq_length * micro_batch_size, micro_batch_size=1)
    return dict(seq_length=seq_length, micro_batch_size=micro_batch_size)


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> None:
    """Set the logits of the padded ids (`vocab_size` and up) to -inf, in place, in this rank's
    shard [..., v/tp] of the vocabulary (the padding ends the last shards). The loss, the
    z-loss and generation then see the true vocabulary only, and the padded output rows get no
    gradient. Without padding this does nothing."""
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard > vocab_size:
        logits[..., max(vocab_size - start, 0):].fill_(float("-inf"))


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over a vocabulary split across tensor-parallel ranks."""
    local_max = logits.max(dim=-1).values.detach()
    group = parallel_state.get_tensor_model_parallel_group()
    torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=group)
    sum_exp = (logits - local_max.unsqueeze(-1)).exp().sum(dim=-1)
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(sum_exp)
    return sum_exp.log() + local_max


def build_model(cfg: Config) -> list[MM1Model]:
    """This rank's model chunks (one per virtual pipeline stage), made on the run's device:
    megatron's layers allocate there themselves; the plain torch modules (patch embedding,
    norms, connector) through the default device."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    with torch.device(device()):
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            chunks.append(
                MM1Model(
                    cfg,
                    pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                    post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                    vp_stage=stage,
                )
            )
    check_placement(chunks)
    return chunks
