"""What an engine is to the training loop and the benchmark, and what both engines share: the
loss and the reduction of a step's metrics.

An engine owns the model, its optimizer and LR schedule. A step is `forward_backward` (every
micro-batch of this data-parallel rank, gradients reduced) then `optimizer_step`; the benchmark
times the two apart through the same calls that `train_step` makes. Micro-batches arrive on the
run's device (megatron_mm1.device.to_device).
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_mm1.config import Config
from megatron_mm1.device import device


class Engine(abc.ABC):
    cfg: Config
    num_microbatches: int
    optimizer: torch.optim.Optimizer
    scheduler: object  # megatron's OptimizerParamScheduler

    @abc.abstractmethod
    def model_chunks(self) -> list[torch.nn.Module]:
        """This rank's MM1Model chunks, unwrapped."""

    @abc.abstractmethod
    def forward_backward(self, microbatches: list[dict]) -> dict:
        """Forward and backward of the step's micro-batches; their metrics (reduce_metrics)."""

    @abc.abstractmethod
    def evaluate(self, microbatches: list[dict]) -> float:
        """The language-model loss of the step's micro-batches (forward only, dropout off),
        averaged over micro-batches and data-parallel ranks; the same on every rank."""

    @abc.abstractmethod
    def optimizer_step(self, metrics: dict) -> dict:
        """The update, skipped when any loss or gradient is NaN/Inf; `metrics` plus `skipped`,
        `grad_norm` and `lr`."""

    @abc.abstractmethod
    def save(self, path: Path, background: bool = False) -> list:
        """Write this rank's part of a checkpoint into `path`; `background`: plan it and return
        the AsyncRequests that write it (checkpoint.BackgroundSaves)."""

    @abc.abstractmethod
    def load(self, path: Path, load_optimizer: bool) -> None: ...

    def train_step(self, microbatches: list[dict]) -> dict:
        return self.optimizer_step(self.forward_backward(microbatches))

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict, new_schedule: bool = False) -> None:
        """Continue the saved schedule at its step; `new_schedule`: under this config's
        settings (peak, warmup, length) instead of the saved ones."""
        self.scheduler.override_opt_param_scheduler = new_schedule
        self.scheduler.load_state_dict(state)


def build_engine(cfg: Config, num_microbatches: int) -> Engine:
    if cfg.training.engine == "deepspeed":
        from megatron_mm1.ds_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, num_microbatches)
    from megatron_mm1.engine import MegatronEngine

    return MegatronEngine(cfg, num_microbatches)


def loss_func(loss_mask: torch.Tensor, output):
    """Mean over the micro-batch's text targets of an MM1Output; megatron averages over
    micro-batches and DP."""
    mask = loss_mask.float()
    count = mask.sum().clamp(min=1.0)
    lm_loss = (output.lm_loss * mask).sum() / count
    loss = lm_loss
    metrics = {"lm_loss": lm_loss.detach().clone()}
    if output.z_loss is not None:
        z_loss = (output.z_loss * mask).sum() / count
        loss = loss + z_loss
        metrics["logits_z_loss"] = z_loss.detach().clone()
    return loss, metrics


def reduce_metrics(losses: list[dict], cfg: Config, num_microbatches: int, training: bool = True) -> dict[str, float]:
    """Average the last stage's per-micro-batch metrics over micro-batches and DP ranks, and
    share them with every rank. Not `training`: the language-model loss alone."""
    names = ["lm_loss", "logits_z_loss"] if cfg.model.logits_z_loss_coeff and training else ["lm_loss"]
    values = torch.zeros(len(names), dtype=torch.float64, device=device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        per_microbatch = torch.stack([torch.stack([d[n].double() for n in names]) for d in losses])
        values += per_microbatch.sum(0) / (len(losses) * parallel_state.get_data_parallel_world_size())
    torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    # Only the last pipeline stage holds losses: a sum over PP shares them.
    torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    out = dict(zip(names, values.tolist()))
    out["loss"] = sum(out.values())
    if cfg.model.moe.num_experts and training:
        out.update(_moe_losses(cfg, num_microbatches))
    return out


def _moe_losses(cfg: Config, num_microbatches: int) -> dict[str, float]:
    """The MoE auxiliary losses (per MoE layer, before their coefficients), reported apart."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, track_moe_metrics

    z_loss = get_moe_layer_wise_logging_tracker().get("z_loss")
    if z_loss is not None:
        # megatron's router records its z-loss with no group: each rank's would be reported
        # alone. Average over the ranks whose tokens differ (TP too under sequence parallelism).
        z_loss["avg_group"] = parallel_state.get_data_parallel_group() if not cfg.parallel.sequence_parallel \
            else parallel_state.get_tensor_and_data_parallel_group()
    totals: dict = {}
    track_moe_metrics(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        total_loss_dict=totals,
        num_layers=cfg.model.llm.num_layers,
        moe_layer_freq=cfg.model.moe.layer_freq,
        force_initialize=True,
        track_names=["load_balancing_loss", "z_loss"],
    )
    return {f"moe_{name}": float(value) for name, value in totals.items()}
