"""The megatron engine: DDP with the distributed optimizer, the loss, forward/backward through
megatron-core's pipeline schedules (1F1B, interleaved for virtual stages), the optimizer step
with NaN/Inf skipping, and its checkpoint state."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mm1.checkpoint import load_model, model_sharded_state_dict, save_model, save_sharded
from megatron_mm1.config import Config
from megatron_mm1.device import device
from megatron_mm1.engine_base import Engine, loss_func, reduce_metrics
from megatron_mm1.models.mm1 import MM1Model, pipeline_shape


def wrap_ddp(
    chunks: list[MM1Model],
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> list[DistributedDataParallel]:
    """Megatron DDP around each model chunk (gradients in fp32 main_grad buffers)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
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


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"])
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
    every rank. Gradients end in each parameter's `main_grad`, reduced across DP; none with
    `forward_only` (the language-model loss alone then). The micro-batches are on the device.
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
        **pipeline_shape(cfg, cfg.data.seq_length, cfg.training.micro_batch_size),
        forward_only=forward_only,
    )
    return reduce_metrics(losses, cfg, num_microbatches, training=not forward_only)


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


def build_optimizer(cfg: Config, model: list):
    """megatron-core's optimizer (AdamW; distributed over DP if configured) and its warmup +
    cosine LR schedule, with MM1's defaults (see recipe.py)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_mm1 import recipe

    t = cfg.training
    lr, wd = recipe.peak_lr(cfg), recipe.weight_decay(cfg)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=lr * t.min_lr_ratio,
            weight_decay=wd,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.grad_clip,
            bf16=t.bf16,
            params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
            use_distributed_optimizer=t.distributed_optimizer,
        ),
        model,
    )
    scheduler = recipe.lr_scheduler(cfg, optimizer)
    return optimizer, scheduler


def _all_finite(loss: float, model: list) -> bool:
    """True on every rank iff the loss and every gradient are finite on every rank."""
    finite = torch.tensor([1.0 if math.isfinite(loss) else 0.0], device=device())
    grads = [p.main_grad for chunk in model for p in chunk.parameters() if getattr(p, "main_grad", None) is not None]
    if grads:  # fused max-abs per gradient (NaN propagates), no host round trip per parameter
        finite *= torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite[0])


def _materialize_adam_state(optimizer) -> None:
    """Give every parameter an Adam state to load into. Without apex or TransformerEngine
    megatron-core falls back to torch's AdamW, whose per-parameter `step` its state
    initialiser leaves out, while its checkpoint code requires it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # on the host, where torch's AdamW keeps it
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


def _restore_adam_step(optimizer) -> None:
    """megatron-core keeps torch AdamW's step in the param groups of its checkpoint, but its
    dp-reshardable loader then overwrites each parameter's step with the placeholder above;
    set it back from the param groups (it drives Adam's bias correction)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            if "step" in group:
                for p in group["params"]:
                    opt.optimizer.state[p]["step"] = torch.tensor(float(group["step"]))


def _let_empty_optimizers_checkpoint(optimizer) -> None:
    """Let a chained optimizer that holds no parameter on this rank (the expert optimizer of a
    pipeline stage without MoE layers, say) save and load. Without apex or TransformerEngine
    megatron-core reads Adam's step from the per-parameter state, which it then does not have,
    and fails; its state is only its param groups, given the step of this rank's other
    optimizers (they all step together)."""
    chain = getattr(optimizer, "chained_optimizers", [optimizer])

    def param_groups_only(opt) -> dict:
        step = max((float(s["step"]) for o in chain for s in o.optimizer.state.values()), default=0.0)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": step} for g in opt.optimizer.param_groups]
        return {"optimizer": {"param_groups": groups}}

    for opt in chain:
        if not any(group["params"] for group in opt.optimizer.param_groups):
            opt.state_dict = partial(param_groups_only, opt)


# The optimizer state is saved so that it can be resharded over data-parallel ranks.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronEngine(Engine):
    """Model chunks under megatron DDP, megatron's optimizer and LR schedule."""

    def __init__(self, cfg: Config, num_microbatches: int):
        from megatron_mm1.models.mm1 import build_model

        self.cfg = cfg
        self.num_microbatches = num_microbatches
        t = cfg.training
        self.model = wrap_ddp(
            build_model(cfg),
            use_distributed_optimizer=t.distributed_optimizer,
            overlap_grad_reduce=t.overlap_grad_reduce,
            overlap_param_gather=t.distributed_optimizer and t.overlap_param_gather,
        )
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        _let_empty_optimizers_checkpoint(self.optimizer)

    def model_chunks(self) -> list[MM1Model]:
        return [chunk.module for chunk in self.model]

    def forward_backward(self, microbatches: list[dict]) -> dict:
        # Under overlap_param_gather the last update's parameters are gathered bucket by bucket
        # as the forward reaches them (megatron's forward pre-hooks), not in optimizer_step.
        self.optimizer.zero_grad()
        return forward_backward(self.model, microbatches, self.cfg, self.num_microbatches)

    def evaluate(self, microbatches: list[dict]) -> float:
        # As Megatron-LM evaluates: the updated parameters gathered first (overlap_param_gather
        # defers that to the next forward's hooks, which are off meanwhile).
        hooked = [chunk for chunk in self.model if chunk.use_forward_hook]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=True)
        for chunk in self.model:
            chunk.eval()
        try:
            with torch.no_grad():
                metrics = forward_backward(self.model, microbatches, self.cfg, self.num_microbatches, forward_only=True)
        finally:
            for chunk in self.model:
                chunk.train()
            for chunk in hooked:
                chunk.enable_forward_pre_hook()
        return metrics["lm_loss"]

    def optimizer_step(self, metrics: dict) -> dict:
        if not _all_finite(metrics["loss"], self.model):
            return {**metrics, "skipped": True, "grad_norm": math.nan, "lr": self.lr()}
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return {**metrics, "skipped": False, "grad_norm": float(grad_norm), "lr": self.lr()}

    def _sync_params(self) -> None:
        """Finish gathering the updated parameters (deferred to the next forward under
        overlap_param_gather) so that the weights saved are the current ones."""
        for chunk in self.model:
            if chunk.use_forward_hook:
                chunk.disable_forward_pre_hook(param_sync=True)
                chunk.enable_forward_pre_hook()

    def save(self, path: Path, background: bool = False) -> list:
        """Weights in path/model (any layout can load them), optimizer in path/optimizer."""
        self._sync_params()
        model = save_model(self.model, path / "model", background)
        state = self.optimizer.sharded_state_dict(
            model_sharded_state_dict(self.model), metadata=_OPTIMIZER_METADATA
        )
        optimizer = save_sharded({"optimizer": state}, path / "optimizer", background)
        return [model, optimizer] if background else []

    def load(self, path: Path, load_optimizer: bool) -> None:
        from megatron.core import dist_checkpointing

        self._sync_params()  # no gather in flight may overwrite the loaded weights
        load_model(self.model, path / "model")
        if load_optimizer:
            _materialize_adam_state(self.optimizer)
            state = self.optimizer.sharded_state_dict(
                model_sharded_state_dict(self.model), is_loading=True, metadata=_OPTIMIZER_METADATA
            )
            loaded = dist_checkpointing.load({"optimizer": state}, str(path / "optimizer"))
            with torch.no_grad():  # it copies into the main parameters in place
                self.optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_step(self.optimizer)
        else:
            # bf16: the optimizer copied its fp32 master weights at construction; without this
            # the first step would write those back over the loaded ones (Megatron-LM does this too).
            self.optimizer.reload_model_params()
