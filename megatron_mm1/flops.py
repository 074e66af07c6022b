"""FLOPs of a training step of the whole MM1 model: vision encoder, connector and LLM.

Counted: matrix products and convolutions (2 FLOPs per multiply-add), the work that dominates
and that accelerator peaks are quoted for. Not counted: norms, softmax, activations, RoPE,
pooling, the loss, embedding look-ups. The per-token, per-pair and per-image formulas are in
arithmetic.py (and docs/performance.md); here they are summed over a batch, by part.

The LLM's work is given by its tokens and the query-key pairs its attention meets per layer:
- throughput and MFU (`batch_flops`) count the work the model needs: the real tokens (padding
  excluded) and each packed sample's causal pairs, L(L+1)/2 for L tokens, whichever kernel runs;
- what a kernel executes is arithmetic.kernel_pairs over every token of the rows: megatron's
  DotProductAttention (the local spec) computes all s^2 pairs of a row and masks afterwards,
  which is what torch's FlopCounterMode sees; the tests compare like with like through it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megatron_mm1 import arithmetic
from megatron_mm1.config import Config

if TYPE_CHECKING:
    import torch


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


def forward_flops(cfg: Config, tokens: int, pairs: int, num_images: int) -> dict[str, float]:
    """Forward FLOPs by part: the LLM over `tokens` tokens whose attention meets `pairs`
    query-key pairs in each layer, and the vision side over `num_images` images (their image
    tokens are among `tokens`)."""
    llm, images = cfg.model.llm, 2.0 * num_images
    layers = sum(arithmetic.layer_macs(cfg, arithmetic.is_moe_layer(cfg, i)) for i in range(llm.num_layers))
    return {
        "patch_embed": images * arithmetic.patch_embed_macs(cfg),
        "vision": images * cfg.model.vision.num_layers_used * arithmetic.vision_layer_macs(cfg),
        "connector": images * arithmetic.connector_macs(cfg),
        "llm_linear": 2.0 * tokens * layers,
        "llm_attention": 2.0 * pairs * llm.num_layers * arithmetic.attention_macs_per_pair(cfg),
        "logits": 2.0 * tokens * arithmetic.output_layer_macs(cfg),
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


def train_flops(cfg: Config, tokens: int, pairs: int, num_images: int) -> dict[str, float]:
    """Forward + backward FLOPs by part (forward_flops' arguments), and their `total`."""
    fwd = forward_flops(cfg, tokens, pairs, num_images)
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
    return train_flops(cfg, sum(lengths), arithmetic.causal_pairs(lengths), int(batch["num_images"].sum()))["total"]
