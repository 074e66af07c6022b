"""Parameter counts of a config, from a model built on the meta device (no memory allocated)."""

from __future__ import annotations

import dataclasses
import os

from megatron_mm1.config import Config, ParallelConfig, validate


def count_parameters(cfg: Config) -> dict[str, int]:
    """total, llm, vision, connector and active (used per token: top-k of the experts)."""
    # Counts do not depend on the layout: build the whole model in one process. Hiding CUDA
    # keeps megatron-core's initialisation off the GPU (it would allocate there explicitly).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    from megatron.core import parallel_state

    from megatron_mm1 import cpu_compat
    from megatron_mm1.models.mm1 import MM1Model

    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    validate(cfg, world_size=1)
    cpu_compat.enable()
    created_group = not torch.distributed.is_initialized()
    if created_group:
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        with torch.device("meta"):
            model = MM1Model(cfg)
    finally:
        parallel_state.destroy_model_parallel()
        if created_group:
            torch.distributed.destroy_process_group()

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
