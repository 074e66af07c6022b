"""MM1's optimisation recipe: the peak learning-rate fit, the weight-decay convention and the
warmup + cosine schedule.

Weight decay convention: MM1 sets the decoupled weight decay to lambda = 0.1 x the peak LR,
meaning each step shrinks weights by lambda at the peak. PyTorch's (and megatron-core's)
AdamW multiply their `weight_decay` coefficient by the current LR, so lambda = 0.1 x eta is
`weight_decay = 0.1` there; it follows the LR schedule. Norms and biases are not decayed.
"""

from __future__ import annotations

import math

from megatron_mm1.config import Config


def llm_non_embedding_params(cfg: Config) -> int:
    """N of MM1's fit: the LLM's parameters without the input and output embeddings. For MoE,
    the parameters used per token (router plus top-k experts)."""
    llm, moe = cfg.model.llm, cfg.model.moe
    head_dim = llm.head_dim
    h = llm.hidden_size
    attention = (h + llm.qkv_bias) * head_dim * (llm.num_attention_heads + 2 * llm.num_query_groups)  # qkv
    attention += llm.num_attention_heads * head_dim * h  # output projection
    if llm.qk_layernorm:
        attention += 2 * head_dim
    dense_mlp = 3 * h * llm.ffn_hidden_size  # SwiGLU: gate, up, down
    moe_mlp = 0
    if moe.num_experts:
        expert_ffn = moe.ffn_hidden_size or llm.ffn_hidden_size
        moe_mlp = h * moe.num_experts + moe.router_topk * 3 * h * expert_ffn
    total = h  # final norm
    for layer in range(llm.num_layers):
        is_moe = moe.num_experts and layer % moe.layer_freq == 0
        total += attention + 2 * h + (moe_mlp if is_moe else dense_mlp)
    return total


def mm1_peak_lr(non_embedding_params: int) -> float:
    """MM1's fit of the optimal peak LR: exp(-0.4214 ln N - 0.5535)."""
    return math.exp(-0.4214 * math.log(non_embedding_params) - 0.5535)


def peak_lr(cfg: Config) -> float:
    t = cfg.training
    return t.lr if t.lr is not None else mm1_peak_lr(llm_non_embedding_params(cfg))


def weight_decay(cfg: Config) -> float:
    return cfg.training.weight_decay if cfg.training.weight_decay is not None else 0.1


def warmup_steps(cfg: Config) -> int:
    # A run shorter than the warmup still reaches its peak on its last step.
    return min(cfg.training.warmup_steps, cfg.training.steps - 1)


def lr_scheduler(cfg: Config, optimizer):
    """megatron-core's scheduler with MM1's schedule: linear warmup from 0, cosine decay to
    `min_lr_ratio` of the peak at `training.steps`, constant weight decay. It drives any
    optimizer with torch-style param groups (both engines use it)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.training
    lr, wd = peak_lr(cfg), weight_decay(cfg)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=lr * t.min_lr_ratio,
        lr_warmup_steps=warmup_steps(cfg),
        lr_decay_steps=t.steps,
        lr_decay_style="cosine",
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
