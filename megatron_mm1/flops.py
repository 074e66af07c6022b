"""FLOPs of a training step of the whole MM1 model: vision encoder, connector and LLM.

Counted: matrix products and convolutions (2 FLOPs per multiply-add), the work that dominates
and that accelerator peaks are quoted for. Not counted: norms, softmax, activations, RoPE,
pooling, the loss, embedding look-ups. The formula is in docs/performance.md.

Two attention conventions:
- `causal=True` (what throughput reports use): a token attends to itself and the earlier tokens
  of its own packed sample, so a sample of L tokens costs L(L+1)/2 query-key pairs; padding
  counts nothing. This is the work the model needs, whichever kernel runs it.
- `causal=False`: every query meets every key of its row, L^2 pairs. This is what an unfused
  kernel (megatron's DotProductAttention, or SDPA's math path) executes with a mask, and what
  torch's FlopCounterMode sees; the tests compare like with like through it.
"""

from __future__ import annotations

import math

import torch

from megatron_mm1.config import Config


def segment_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Lengths of the packed samples of a [b, s] segment-id tensor (0 = padding, excluded)."""
    lengths = []
    for row in segment_ids.tolist():
        run, prev = 0, 0
        for seg in row:
            if seg != prev and run:
                lengths.append(run)
                run = 0
            if seg > 0:
                run += 1
            prev = seg
        if run:
            lengths.append(run)
    return lengths


def _llm_forward(cfg: Config, lengths: list[int], causal: bool) -> dict[str, float]:
    llm, moe = cfg.model.llm, cfg.model.moe
    h, d = llm.hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * d, llm.num_query_groups * d
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    attn_proj = h * (q + 2 * kv) + q * h  # QKV and output projection, multiply-adds per token
    dense_ffn = 3 * h * llm.ffn_hidden_size  # SwiGLU: gate and up (h -> 2f), down (f -> h)
    n_moe = 0
    moe_ffn = 0
    if moe.num_experts:
        n_moe = len(range(0, llm.num_layers, moe.layer_freq))
        # Router (h -> experts) plus top-k experts per token, each a SwiGLU of its own width.
        moe_ffn = h * moe.num_experts + moe.router_topk * 3 * h * (moe.ffn_hidden_size or llm.ffn_hidden_size)
    per_token = llm.num_layers * attn_proj + (llm.num_layers - n_moe) * dense_ffn + n_moe * moe_ffn
    return {
        "llm_linear": 2.0 * tokens * per_token,
        # QK^T and attention x V: two products of head_dim per query-key pair and query head.
        "llm_attention": 2.0 * 2 * pairs * q * llm.num_layers,
        "logits": 2.0 * tokens * h * llm.vocab_size,
    }


def _vision_forward(cfg: Config, num_images: int) -> dict[str, float]:
    v = cfg.model.vision
    w, t = v.hidden_size, v.sequence_length  # bidirectional attention
    per_layer = t * (4 * w * w + 2 * w * v.ffn_hidden_size) + 2 * t * t * w
    return {
        "patch_embed": 2.0 * num_images * v.num_patches * 3 * v.patch_size**2 * w,
        "vision": 2.0 * num_images * v.num_layers_used * per_layer,
    }


def _bottleneck_macs(hw: int, cin: int, cout: int) -> int:
    """A RegNetY bottleneck of models/connector.py on an hw-pixel map (the SE runs on 1 pixel)."""
    reduced = int(round(cin * 0.25))
    macs = hw * cin * cout + hw * cout * 9 + 2 * cout * reduced + hw * cout * cout
    return macs + (hw * cin * cout if cin != cout else 0)


def _connector_forward(cfg: Config, num_images: int) -> float:
    c, v, llm_width = cfg.model.connector, cfg.model.vision, cfg.model.llm.hidden_size
    n, p, w = c.num_image_tokens, v.num_patches, v.hidden_size
    if c.type == "c-abstractor":
        macs = sum(_bottleneck_macs(p, w if i == 0 else c.hidden_size, c.hidden_size) for i in range(c.depth))
        macs += c.depth * _bottleneck_macs(n, c.hidden_size, c.hidden_size)
        macs += n * (c.hidden_size * llm_width + (c.mlp_depth - 1) * llm_width * llm_width)
    elif c.type == "avg-pool":
        macs = n * w * llm_width
    else:  # attn-pool: q/out projections on N queries, k/v on P patches, N x P attention
        macs = 2 * n * w * w + 2 * p * w * w + 2 * n * p * w + n * w * llm_width
    return 2.0 * num_images * macs


def forward_flops(
    cfg: Config, lengths: list[int], num_images: int, causal: bool = True
) -> dict[str, float]:
    """Forward FLOPs by part for packed samples of the given token lengths and `num_images`
    images (each image's N tokens are part of its sample's length)."""
    return {
        **_vision_forward(cfg, num_images),
        "connector": _connector_forward(cfg, num_images),
        **_llm_forward(cfg, lengths, causal),
    }


def backward_multipliers(cfg: Config) -> dict[str, float]:
    """Training FLOPs per forward FLOP of each part: forward + backward.

    A product y = x W costs, in backward, x's gradient (when anything before it trains) and
    W's gradient (when W trains): one forward's worth each. Attention's QK^T and PV have no
    weights: when backward passes through them both operands need gradients."""
    m = cfg.model
    vision, connector, llm = not m.freeze_vision, not m.freeze_connector, not m.freeze_llm
    before_llm = vision or connector or llm  # the embedding is part of the LLM
    return {
        "patch_embed": 2.0 if vision else 1.0,  # the images never need a gradient
        "vision": 3.0 if vision else 1.0,
        "connector": 1.0 + connector + vision,
        "llm_linear": 1.0 + llm + before_llm,
        "llm_attention": 3.0 if before_llm else 1.0,
        "logits": 1.0 + llm + before_llm,
    }


def train_flops(
    cfg: Config, lengths: list[int], num_images: int, causal: bool = True
) -> dict[str, float]:
    """Forward + backward FLOPs by part, and their `total`."""
    fwd = forward_flops(cfg, lengths, num_images, causal)
    mult = backward_multipliers(cfg)
    parts = {k: fwd[k] * mult[k] for k in fwd}
    parts["total"] = math.fsum(parts.values())
    return parts


def batch_tokens(batch: dict) -> int:
    """Text + image tokens of a micro-batch, padding excluded."""
    return int((batch["segment_ids"] > 0).sum())


def batch_flops(cfg: Config, batch: dict) -> float:
    """Training FLOPs of one micro-batch in the batch contract (causal, padding excluded)."""
    lengths = segment_lengths(batch["segment_ids"])
    return train_flops(cfg, lengths, int(batch["num_images"].sum()))["total"]
