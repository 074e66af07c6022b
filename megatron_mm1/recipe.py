"""MM1's optimisation recipe: the peak learning-rate fit, the weight-decay convention and the
warmup + cosine schedule.

Weight decay convention: MM1 sets the decoupled weight decay to lambda = 0.1 x the peak LR,
meaning each step shrinks weights by lambda at the peak. PyTorch's (and megatron-core's)
AdamW multiply their `weight_decay` coefficient by the current LR, so lambda = 0.1 x eta is
`weight_decay = 0.1` there; it follows the LR schedule. Norms and biases are not decayed.
"""

from __future__ import annotations

import math

from megatron_mm1 import arithmetic
from megatron_mm1.config import Config


def mm1_peak_lr(non_embedding_params: int) -> float:
    """MM1's fit of the optimal peak LR: exp(-0.4214 ln N - 0.5535)."""
    return math.exp(-0.4214 * math.log(non_embedding_params) - 0.5535)


def peak_lr(cfg: Config) -> float:
    t = cfg.training
    # N of MM1's fit: the LLM without its input and output embeddings; for MoE, the parameters a
    # token uses (router plus top-k experts).
    return t.lr if t.lr is not None else mm1_peak_lr(arithmetic.decoder_parameters(cfg, active=True))


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
