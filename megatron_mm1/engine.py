"""One training step's machinery on megatron-core: DDP wrapping, the loss, and forward/backward
through megatron-core's pipeline schedules (1F1B, interleaved for virtual stages)."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mm1.checkpoint import model_sharded_state_dict
from megatron_mm1.config import Config
from megatron_mm1.data.packing import attention_mask_from_segments
from megatron_mm1.models.mm1 import MM1Model, MM1Output


def wrap_ddp(
    chunks: list[MM1Model], use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False
) -> list[DistributedDataParallel]:
    """Megatron DDP around each model chunk (gradients in fp32 main_grad buffers)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in wrapped]
        if len(wrapped) == 1:
            config.no_sync_func = config.no_sync_func[0]
    return wrapped


def loss_func(loss_mask: torch.Tensor, output: MM1Output):
    """Mean over the micro-batch's text targets; megatron averages over micro-batches and DP."""
    mask = loss_mask.float()
    count = mask.sum().clamp(min=1.0)
    lm_loss = (output.lm_loss * mask).sum() / count
    loss = lm_loss
    metrics = {"lm_loss": lm_loss.detach().clone()}
    if output.z_loss is not None:
        z_loss = (output.z_loss * mask).sum() / count
        loss = loss + z_loss
        metrics["z_loss"] = z_loss.detach().clone()
    return loss, metrics


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    mask = attention_mask_from_segments(batch["segment_ids"])
    output = model(batch["tokens"], mask, images=batch["images"], labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def forward_backward(
    model: list[torch.nn.Module],
    microbatches: list[dict],
    cfg: Config,
    num_microbatches: int,
    forward_only: bool = False,
) -> dict[str, float]:
    """Run one global step's micro-batches (this DP rank's share) through the pipeline.

    Returns the micro-batch-averaged metrics, averaged over data-parallel ranks and present on
    every rank. Gradients end in each parameter's `main_grad`, reduced across DP.
    """
    # Each virtual pipeline chunk reads the micro-batches through its own iterator.
    iterators = [iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches)
    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        forward_only=forward_only,
    )
    return _reduce_metrics(losses, cfg)


def _reduce_metrics(losses: list[dict], cfg: Config) -> dict[str, float]:
    """Average the last stage's per-micro-batch metrics over micro-batches and DP ranks, and
    share them with every rank."""
    names = ["lm_loss", "z_loss"] if cfg.model.logits_z_loss_coeff else ["lm_loss"]
    values = torch.zeros(len(names), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for d in losses:
            values += torch.tensor([float(d[n]) for n in names], dtype=torch.float64)
        values /= max(len(losses), 1) * parallel_state.get_data_parallel_world_size()
    torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    # Only the last pipeline stage holds losses: a sum over PP shares them.
    torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    out = dict(zip(names, values.tolist()))
    out["loss"] = sum(out.values())
    return out


def grads_sharded_state_dict(model: list[torch.nn.Module]) -> dict:
    """The model's sharded state dict with each parameter's reduced gradient (`main_grad`) in
    place of its value: saved as a checkpoint, gradients compare across layouts."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    grads = {}
    for chunk in model:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            grads[id(p)] = g if g is not None else torch.zeros_like(p)

    def swap(tree) -> None:
        for key, value in list(tree.items() if isinstance(tree, dict) else enumerate(tree)):
            if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and id(value.data) in grads:
                value.data = grads[id(value.data)].to(value.data.dtype).view_as(value.data)
            elif isinstance(value, (dict, list)):
                swap(value)

    state = model_sharded_state_dict(model)
    swap(state)
    return state
