"""The model's arithmetic, from its config alone: parameters of each part, matrix-product
multiply-adds per token, query-key pair and image, and the bytes each layer keeps for backward.
`mm1 params`, flops.py, the planner and the recipe all count through these functions; the tests
check them against real models (tests/test_planner.py: parameters per rank and saved tensors;
tests/test_flops.py: torch's FlopCounterMode). The formulas are in docs/performance.md.

Parameter counts take the tensor-, expert- and expert-tensor-parallel sizes and give one rank's
share (1: the whole part). Activation bytes follow the config's parallel settings. No torch here:
the command-line parsers import the planner, which imports this.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm1.config import Config

# ----------------------------------------------------------------------------- layer specs


@dataclass(frozen=True)
class Kernels:
    """Where the layer specs differ in cost (models/specs.py builds them)."""

    causal_pairs_only: bool  # the LLM's attention computes each packed sample's causal pairs, not all s^2 of a row
    mask_bytes: int  # per entry of the [b, 1, s, s] mask all LLM layers share (0: no mask)
    keeps_probabilities: bool  # attention keeps [heads, s, s] probabilities (else a logsumexp per query and head)
    fused_swiglu: bool  # SwiGLU keeps only its input (eager: more [tokens, ffn] tensors)


LAYER_SPECS = {
    # megatron's DotProductAttention: baddbmm over the whole row, masked afterwards by the boolean
    # mask, fp32 softmax and its bf16 copy kept; eager SwiGLU.
    "local": Kernels(causal_pairs_only=False, mask_bytes=1, keeps_probabilities=True, fused_swiglu=False),
    # Attention by packed sample (models/attention.py): varlen flash on CUDA, one causal SDPA call
    # per sample on CPU.
    "fast": Kernels(causal_pairs_only=True, mask_bytes=0, keeps_probabilities=False, fused_swiglu=True),
    # Transformer Engine's flash/cuDNN attention over THD-packed samples, megatron's fused SwiGLU.
    "te": Kernels(causal_pairs_only=True, mask_bytes=0, keeps_probabilities=False, fused_swiglu=True),
}


def kernels(cfg: Config) -> Kernels:
    return LAYER_SPECS[cfg.model.layer_spec]


def causal_pairs(lengths: list[int]) -> int:
    """Query-key pairs of causal attention within samples of these lengths: sum L(L+1)/2. The
    work the model needs (MFU's convention), whichever kernel runs it."""
    return sum(n * (n + 1) // 2 for n in lengths)


def kernel_pairs(cfg: Config, runs: list[int]) -> int:
    """Query-key pairs the layer spec's LLM attention computes per layer for rows of
    data.seq_length tokens cut into `runs` (the packed samples and each row's padding)."""
    if kernels(cfg).causal_pairs_only:
        return causal_pairs(runs)
    s = cfg.data.seq_length
    return sum(runs) // s * s * s


# ----------------------------------------------------------------------------- parameters


def is_moe_layer(cfg: Config, layer: int) -> bool:
    moe = cfg.model.moe
    return moe.num_experts > 0 and layer % moe.layer_freq == 0


def embedding_parameters(cfg: Config, tp: int = 1) -> int:
    """The input embedding, and the output layer (the same shape), split over TP by vocabulary."""
    llm = cfg.model.llm
    return llm.padded_vocab_size * llm.hidden_size // tp


def layer_parameters(cfg: Config, moe_layer: bool, tp: int = 1) -> int:
    """One decoder layer without its experts: the two norms, attention, and the dense SwiGLU or
    the MoE router (replicated). Column-parallel QKV shards weight and bias; the row-parallel
    output projection and FC2 shard their weight."""
    llm = cfg.model.llm
    h, d = llm.hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * d, llm.num_query_groups * d
    attention = (q + 2 * kv) * (h + llm.qkv_bias) // tp + h * q // tp + (2 * d if llm.qk_layernorm else 0)
    mlp = cfg.model.moe.num_experts * h if moe_layer else 3 * llm.ffn_hidden_size * h // tp
    return 2 * h + attention + mlp


def expert_parameters(cfg: Config, etp: int = 1) -> int:
    """One expert: a SwiGLU of the expert width, split over expert-TP."""
    llm = cfg.model.llm
    return 3 * (cfg.model.moe.ffn_hidden_size or llm.ffn_hidden_size) * llm.hidden_size // etp


def final_norm_parameters(cfg: Config) -> int:
    return cfg.model.llm.hidden_size  # RMSNorm: a weight, replicated


def decoder_parameters(cfg: Config, active: bool = False) -> int:
    """All decoder layers and the final norm; `active`: with only the top-k experts a token is
    routed to (MM1's N for the learning-rate fit)."""
    moe = cfg.model.moe
    experts = moe.router_topk if active else moe.num_experts
    total = final_norm_parameters(cfg)
    for i in range(cfg.model.llm.num_layers):
        moe_layer = is_moe_layer(cfg, i)
        total += layer_parameters(cfg, moe_layer) + (experts * expert_parameters(cfg) if moe_layer else 0)
    return total


def vision_parameters(cfg: Config, tp: int = 1) -> int:
    """The ViT up to model.vision.feature_layer."""
    v = cfg.model.vision
    w, f = v.hidden_size, v.ffn_hidden_size
    # conv; CLIP's class token or SigLIP's conv bias; positions; CLIP's ln_pre
    embed = 3 * v.patch_size**2 * w + w + v.sequence_length * w + (2 * w if v.arch == "clip" else 0)
    # Two LayerNorms; column-parallel QKV and fc1 shard weight and bias; row-parallel proj and
    # fc2 shard the weight and keep the whole bias.
    layer = 4 * w + (3 * w * w + 3 * w) // tp + w * w // tp + w + (w * f + f) // tp + w * f // tp + w
    return embed + v.num_layers_used * layer


def _squeeze_width(cin: int) -> int:
    return int(round(cin * 0.25))  # timm's RegNetY squeeze-excitation, from the block's input width


def _bottleneck_parameters(cin: int, c: int) -> int:
    """A RegNetY bottleneck of models/connector.py: 1x1 conv, depthwise 3x3, SE, 1x1 conv (each
    conv with a LayerNorm), and a 1x1 conv shortcut when the width changes."""
    r = _squeeze_width(cin)
    convs = cin * c + 9 * c + c * c + 3 * 2 * c
    se = c * r + r + r * c + c
    return convs + se + (cin * c + 2 * c if cin != c else 0)


def connector_parameters(cfg: Config) -> int:
    """The connector (plain torch, replicated on every TP rank)."""
    c, v, h = cfg.model.connector, cfg.model.vision, cfg.model.llm.hidden_size
    w = v.hidden_size
    if c.type == "c-abstractor":
        stages = sum(_bottleneck_parameters(w if i == 0 else c.hidden_size, c.hidden_size) for i in range(c.depth))
        stages += c.depth * _bottleneck_parameters(c.hidden_size, c.hidden_size)
        readout = c.hidden_size * h + h + (c.mlp_depth - 1) * (h * h + h)
        return v.num_patches * w + stages + readout  # positions, RegStages, MLP
    if c.type == "avg-pool":
        return w * h + h
    # attn-pool: queries, multi-head attention (in and out projections with biases), LayerNorm, projection
    return c.num_image_tokens * w + 4 * (w * w + w) + 2 * w + w * h + h


def model_parameters(cfg: Config) -> dict[str, int]:
    """total, llm, vision, connector and active (what a token uses: the top-k experts)."""
    decoder = decoder_parameters(cfg)
    output = 0 if cfg.model.llm.tie_embeddings else embedding_parameters(cfg)
    llm = embedding_parameters(cfg) + decoder + output
    vision, connector = vision_parameters(cfg), connector_parameters(cfg)
    total = llm + vision + connector
    return {"total": total, "llm": llm, "vision": vision, "connector": connector,
            "active": total - decoder + decoder_parameters(cfg, active=True)}


# ----------------------------------------------------------------------------- multiply-adds


def layer_macs(cfg: Config, moe_layer: bool) -> int:
    """Per token, one decoder layer's linear layers: the QKV and output projections, then the
    SwiGLU (gate and up h -> 2f, down f -> h), or the router and top-k experts' SwiGLUs."""
    llm, moe = cfg.model.llm, cfg.model.moe
    h, d = llm.hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * d, llm.num_query_groups * d
    if moe_layer:
        mlp = h * moe.num_experts + moe.router_topk * 3 * h * (moe.ffn_hidden_size or llm.ffn_hidden_size)
    else:
        mlp = 3 * h * llm.ffn_hidden_size
    return h * (q + 2 * kv) + q * h + mlp


def attention_macs_per_pair(cfg: Config) -> int:
    """One layer's QK^T and attention x V: head_dim each per query-key pair and query head."""
    llm = cfg.model.llm
    return 2 * llm.num_attention_heads * llm.head_dim


def output_layer_macs(cfg: Config) -> int:
    """Per token: the logits over the (padded) vocabulary."""
    return cfg.model.llm.hidden_size * cfg.model.llm.padded_vocab_size


def patch_embed_macs(cfg: Config) -> int:
    """Per image: the patch convolution."""
    v = cfg.model.vision
    return v.num_patches * 3 * v.patch_size**2 * v.hidden_size


def vision_layer_macs(cfg: Config) -> int:
    """Per image, one ViT layer: QKV, output projection and MLP per token, and bidirectional
    attention over all T^2 pairs (T = patches + class token)."""
    v = cfg.model.vision
    w, t = v.hidden_size, v.sequence_length
    return t * (4 * w * w + 2 * w * v.ffn_hidden_size) + 2 * t * t * w


def _bottleneck_macs(hw: int, cin: int, c: int) -> int:
    """A RegNetY bottleneck on an hw-pixel map (the SE runs on 1 pixel)."""
    macs = hw * cin * c + hw * c * 9 + 2 * c * _squeeze_width(cin) + hw * c * c
    return macs + (hw * cin * c if cin != c else 0)


def connector_macs(cfg: Config) -> int:
    """Per image."""
    c, v, h = cfg.model.connector, cfg.model.vision, cfg.model.llm.hidden_size
    n, p, w = c.num_image_tokens, v.num_patches, v.hidden_size
    if c.type == "c-abstractor":
        macs = sum(_bottleneck_macs(p, w if i == 0 else c.hidden_size, c.hidden_size) for i in range(c.depth))
        macs += c.depth * _bottleneck_macs(n, c.hidden_size, c.hidden_size)
        return macs + n * (c.hidden_size * h + (c.mlp_depth - 1) * h * h)
    if c.type == "avg-pool":
        return n * w * h
    # attn-pool: q/out projections on N queries, k/v on P patches, N x P attention
    return 2 * n * w * w + 2 * p * w * w + 2 * n * p * w + n * w * h


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(cfg: Config, moe_layer: bool) -> dict[str, float]:
    """Bytes one LLM layer keeps for backward per token of a micro-batch, by the layer's
    submodule whose operations keep them (bf16 activations, fp32 statistics), as on a GPU. Each
    term is a tensor that real layers save; tests/test_planner.py compares the sums with the
    saved tensors of real layers. The attention mask, shared by all layers, is `mask_bytes`."""
    llm, moe, p = cfg.model.llm, cfg.model.moe, cfg.parallel
    spec = kernels(cfg)
    tp = p.tensor_model_parallel_size
    sp = tp if p.sequence_parallel else 1  # the norms' side of the layer holds s / TP tokens
    h, s, heads = llm.hidden_size, cfg.data.seq_length, llm.num_attention_heads
    q, kv = heads * llm.head_dim, llm.num_query_groups * llm.head_dim
    norm = (2 * h + 4) / sp  # input, fp32 1/rms (one fused or compiled kernel)
    # The norm's output (QKV input), RoPE's cos and sin for Q and K, the output projection's input.
    attention = 2 * h / sp + 4 * 2 * llm.head_dim + 2 * q / tp
    if spec.keeps_probabilities and cfg.training.recompute_llm != "selective":
        # Q, K and V as [b * heads, s, d] (K and V repeated to all heads for grouped queries;
        # without groups V stays a view of the QKV output) and the probabilities twice: the
        # fp32 softmax output and its bf16 copy.
        v = 2 * q / tp if kv < q else 2 * (q + 2 * kv) / tp
        attention += 2 * q / tp + 2 * q / tp + v + 6 * heads * s / tp
    else:
        # The QKV output (V is a view of it), rotated Q and K; a fused kernel also keeps its
        # logsumexp. (Selective recomputation keeps the same core-attention inputs, and rebuilds
        # the rest.)
        attention += 2 * (q + 2 * kv) / tp + 2 * q / tp + 2 * kv / tp
        attention += 0 if spec.keeps_probabilities else 4 * heads / tp
    if moe_layer:
        f = moe.ffn_hidden_size or llm.ffn_hidden_size
        etp = p.expert_tensor_parallel_size or tp
        e, k = moe.num_experts, moe.router_topk
        router = (13 * e + 28 * k + 4) / sp  # fp32 logits, probabilities, routing map, indices
        # Each token goes to k experts: its copy of the input, its fp32 weight, then per expert
        # the FC1 output and the SwiGLU output (FC2's input); eager SwiGLU keeps three more.
        # The dispatcher gathers the sequence that SP split over TP back over the expert-TP
        # group, so this rank's experts see k * etp / sp copies per token on average.
        per_copy = 2 * h + 4 + (6 if spec.fused_swiglu else 12) * f / etp
        mlp = 2 * h / sp + router + k * etp / sp * per_copy
    else:
        # FC1's input and output and the SwiGLU output; eager SwiGLU keeps two more.
        mlp = 2 * h / sp + (6 if spec.fused_swiglu else 10) * llm.ffn_hidden_size / tp
    return {"input_layernorm": norm, "self_attention": attention, "pre_mlp_layernorm": norm, "mlp": mlp}


def mask_bytes(cfg: Config) -> float:
    """Bytes per token of the attention mask all LLM layers share: megatron's boolean [s, s] for
    the local spec; none where attention goes by packed sample."""
    return kernels(cfg).mask_bytes * cfg.data.seq_length


def vision_layer_activation_bytes(cfg: Config) -> dict[str, float]:
    """Bytes one ViT layer keeps for backward per token (patch or class token) of an image, as above."""
    v, tp = cfg.model.vision, cfg.parallel.tensor_model_parallel_size
    w, heads, tokens = v.hidden_size, v.num_attention_heads, v.sequence_length
    norm = 2 * w + 8  # LayerNorm: input, fp32 mean and 1/std
    # The QKV input and output (Q, K, V are views of it), the output projection's input; the
    # fp32 and bf16 probabilities, or a fused kernel's logsumexp.
    attention = 2 * w + 6 * w / tp + 2 * w / tp
    attention += 6 * heads * tokens / tp if kernels(cfg).keeps_probabilities else 4 * heads / tp
    mlp = 2 * w + 4 * v.ffn_hidden_size / tp  # FC1's input, QuickGELU's input (compiled) and output
    return {"input_layernorm": norm, "self_attention": attention, "pre_mlp_layernorm": norm, "mlp": mlp}


def connector_activation_bytes(cfg: Config, images: int) -> float:
    """About what the connector keeps for backward: twelve bf16 feature maps per RegNet
    bottleneck (convs, norms, activations, squeeze-excitation); within 20% of real ones."""
    v, c = cfg.model.vision, cfg.model.connector
    return 2.0 * images * 12 * c.depth * c.hidden_size * (v.num_patches + c.num_image_tokens)
