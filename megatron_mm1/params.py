"""Parameter counts of a config, from a model built on the meta device (no memory allocated)."""

from __future__ import annotations

import os

from megatron_mm1.config import Config


def count_parameters(cfg: Config) -> dict[str, int]:
    """total, llm, vision, connector and active (used per token: top-k of the experts)."""
    # Counts do not depend on the layout: build the whole model in one process. Hiding CUDA
    # keeps megatron-core's initialisation off the GPU (it would allocate there explicitly).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from megatron_mm1.models.mm1 import MM1Model
    from megatron_mm1.runtime import shutdown, single_process

    single = single_process(cfg)
    try:
        with torch.device("meta"):
            model = MM1Model(single)
    finally:
        shutdown()

    def size(module) -> int:
        return sum(p.numel() for p in module.parameters())

    experts = sum(p.numel() for n, p in model.llm.named_parameters() if ".experts." in n)
    moe = cfg.model.moe
    inactive = experts - experts * moe.router_topk // moe.num_experts if moe.num_experts else 0
    total = size(model)
    return {
        "total": total,
        "llm": size(model.llm),
        "vision": size(model.vision),
        "connector": size(model.connector),
        "active": total - inactive,
    }
