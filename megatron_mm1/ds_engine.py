"""The DeepSpeed engine: megatron-core's model (tensor parallel) under DeepSpeed's data
parallelism with ZeRO stage 1, 2 or 3 and optional CPU optimizer offload.

It matches the megatron engine's numbers: the same AdamW and parameter groups (no weight decay
on biases and 1-D parameters), megatron's warmup + cosine schedule driving the optimizer, the
same global-norm clipping and the same loss averaging. bf16 comes from training.bf16.

The ZeRO settings come from the JSON file training.deepspeed_config (see deepspeed_configs/);
the batch sizes, clipping and bf16 are ours, written "auto" there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_mm1.checkpoint import load_model, model_sharded_state_dict, save_sharded
from megatron_mm1.config import Config, ConfigError
from megatron_mm1.engine_base import Engine, loss_func, reduce_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_TAG = "state"  # the one DeepSpeed checkpoint inside each of our checkpoint folders
DS_LAYOUT = "mm1_layout.json"  # beside it: the layout its optimizer partitions belong to


def _filled_values(cfg: Config, num_microbatches: int) -> dict[str, object]:
    """The DeepSpeed settings that our config decides, by their path in the JSON."""
    t = cfg.training
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.grad_clip,
        "bf16.enabled": t.bf16,
    }


def deepspeed_config_path(cfg: Config) -> Path:
    """training.deepspeed_config, relative to the working directory or else to the repository
    (where the shipped deepspeed_configs/ live)."""
    path = Path(cfg.training.deepspeed_config)
    if not path.is_absolute() and not path.is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(
            f"training.deepspeed_config={cfg.training.deepspeed_config} does not exist; use one "
            f"of {sorted(p.name for p in (REPO_ROOT / 'deepspeed_configs').glob('*.json'))} in "
            "deepspeed_configs/ or a path to a DeepSpeed JSON config"
        )
    return path


def read_deepspeed_config(cfg: Config, num_microbatches: int) -> dict:
    """The DeepSpeed JSON with our batch sizes, clipping and bf16 filled in. A value fixed in
    the file that contradicts our config is refused, as are sections this engine owns."""
    path = deepspeed_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"training.deepspeed_config={path} is not valid JSON: {e}") from None
    errors = []
    for section, why in (
        ("optimizer", "the optimizer is megatron's AdamW, set by training.lr/adam_*/weight_decay"),
        ("scheduler", "the LR schedule is megatron's warmup + cosine, set by training.*"),
    ):
        if section in ds:
            errors.append(f'remove "{section}": {why}')
    if ds.get("fp16", {}).get("enabled") not in (None, False):
        errors.append('remove "fp16": MM1 trains in bf16 (training.bf16) or fp32')
    for key, ours in _filled_values(cfg, num_microbatches).items():
        *parents, leaf = key.split(".")
        node = ds
        for name in parents:
            node = node.setdefault(name, {})
        if node.get(leaf, "auto") == "auto":
            node[leaf] = ours
        elif node[leaf] != ours:
            errors.append(f'"{key}" is {node[leaf]} but our config gives {ours}; write "auto" there')
    if errors:
        raise ConfigError(f"training.deepspeed_config={path}:\n  - " + "\n  - ".join(errors))
    return ds


class _MegatronMpu:
    """megatron-core's parallel_state as DeepSpeed's `mpu`. DeepSpeed also asks for
    model-parallel and slice-parallel groups: without pipeline parallelism (refused under
    DeepSpeed) both are the tensor-parallel group."""

    _ALIASES = ("get_model_parallel_", "get_slice_parallel_")

    def __getattr__(self, name: str):
        for alias in self._ALIASES:
            if name.startswith(alias):
                name = name.replace(alias, "get_tensor_model_parallel_", 1)
        return getattr(parallel_state, name)


def _param_groups(cfg: Config, model: torch.nn.Module) -> list[dict]:
    """megatron-core's own parameter groups, so that the same parameters skip weight decay
    (biases and 1-D parameters: wd_mult 0) as under the megatron engine."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from megatron_mm1 import recipe

    lr = recipe.peak_lr(cfg)
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=lr * cfg.training.min_lr_ratio, weight_decay=recipe.weight_decay(cfg)
    )
    return [g for g in _get_param_groups([model], config, None) if g["params"]]


def _offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


def build_optimizer(cfg: Config, model: torch.nn.Module, ds_config: dict):
    """AdamW over megatron's parameter groups and megatron's LR schedule driving it.
    Without apex/TE megatron-core uses torch's AdamW; with the optimizer offloaded to the CPU,
    DeepSpeed's vectorised CPU Adam in AdamW mode (same update, compiled on first use)."""

    from megatron_mm1 import recipe

    t = cfg.training
    lr, wd = recipe.peak_lr(cfg), recipe.weight_decay(cfg)
    kwargs = dict(lr=lr, weight_decay=wd, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    groups = _param_groups(cfg, model)
    if _offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    scheduler = recipe.lr_scheduler(cfg, optimizer)
    return optimizer, scheduler


def _balanced_writers(sizes: list[int], ranks: int) -> list[int]:
    """For each tensor, the rank that writes it: largest first, to the least-loaded rank."""
    load, writers = [0] * ranks, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        writers[i] = load.index(min(load))
        load[writers[i]] += sizes[i]
    return writers


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of `tensor`'s shape and dtype on the host that takes no memory."""
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


def _is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and all(stride == 0 for stride in tensor.stride())


def _loss(engine, batch: dict):
    """The micro-batch's loss and metrics (loss_func)."""
    output = engine(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"])
    return loss_func(batch["loss_mask"], output)


class DeepSpeedEngine(Engine):
    """One model (PP=1) under a DeepSpeed ZeRO engine.

    deepspeed.initialize runs on first use (a step, a save or an optimizer load), not here:
    weights loaded before it (resume without the optimizer, at any layout) then become
    DeepSpeed's fp32 master weights, which ZeRO keeps apart from the module's parameters.
    """

    def __init__(self, cfg: Config, num_microbatches: int):
        import deepspeed

        from megatron_mm1.models.mm1 import build_model

        # DeepSpeed logs every step and config field at INFO; the trainer reports progress.
        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.cfg = cfg
        self.num_microbatches = num_microbatches
        self.ds_config = read_deepspeed_config(cfg, num_microbatches)
        (self.model,) = build_model(cfg)  # PP=1 under DeepSpeed: one chunk
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.ds_config)
        self._engine = None
        self._writers: dict[int, int] | None = None  # id(parameter) -> DP rank writing it, while saving

    @property
    def engine(self):
        if self._engine is None:
            import deepspeed

            from megatron_mm1.runtime import dist_env

            # DeepSpeed asserts LOCAL_RANK, which only torchrun sets (not srun, not --nproc 1).
            os.environ.setdefault("LOCAL_RANK", str(dist_env().local_rank))
            self._engine, *_ = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, mpu=_MegatronMpu(), config=self.ds_config
            )
        return self._engine

    def model_chunks(self) -> list[torch.nn.Module]:
        return [self.model]

    def forward_backward(self, microbatches: list[dict]) -> dict:
        """Forward and backward of each micro-batch; DeepSpeed's step after each but the last
        (it only counts micro-steps there), the last in optimizer_step."""
        engine = self.engine
        losses = []
        for i, batch in enumerate(microbatches):
            loss, metrics = _loss(engine, batch)
            engine.backward(loss)  # scaled by 1/num_microbatches, averaged over DP
            if i < len(microbatches) - 1:
                engine.step()
            losses.append(metrics)
        return reduce_metrics(losses, self.cfg, self.num_microbatches)

    def evaluate(self, microbatches: list[dict]) -> float:
        engine = self.engine
        engine.eval()
        try:
            with torch.no_grad():
                losses = [_loss(engine, batch)[1] for batch in microbatches]
        finally:
            engine.train()
        return reduce_metrics(losses, self.cfg, self.num_microbatches, training=False)["lm_loss"]

    def optimizer_step(self, metrics: dict) -> dict:
        """DeepSpeed's step at the accumulation boundary. DeepSpeed checks the reduced gradients
        (NaN/Inf, also from a NaN loss) on every rank and skips the update; the schedule then
        does not advance either."""
        engine = self.engine
        engine.step()
        if not engine.was_step_applied():
            return {**metrics, "skipped": True, "grad_norm": math.nan, "lr": self.lr()}
        self.scheduler.step(increment=1)
        return {**metrics, "skipped": False, "grad_norm": float(engine.get_global_grad_norm()), "lr": self.lr()}

    @contextmanager
    def _weights_to_save(self):
        """Within it, model_sharded_state_dict gives the weights to save in path/model, each
        written by one rank. ZeRO-3 partitions every parameter over the DP ranks; they are
        gathered one at a time, and each is kept (on the host) only by the DP rank chosen to
        write it (balanced by size), the others holding a placeholder of its shape that they
        never write: no rank holds the whole model. Without ZeRO-3 the weights are whole on
        every DP rank and DP rank 0 writes them, as under the megatron engine."""
        if self.engine.zero_optimization_stage() < 3:
            yield
            return
        import deepspeed

        params = list(self.model.parameters())
        dp_rank = parallel_state.get_data_parallel_rank()
        writers = _balanced_writers([p.ds_numel for p in params], parallel_state.get_data_parallel_world_size())
        partitions, whole = [p.data for p in params], []
        for param, writer in zip(params, writers):
            with deepspeed.zero.GatheredParameters([param]):
                mine = writer == dp_rank
                whole.append(param.data.to("cpu", copy=True) if mine else _placeholder(param.data))
        self._writers = {id(param): writer for param, writer in zip(params, writers)}
        try:
            for param, tensor in zip(params, whole):
                param.data = tensor
            yield
        finally:
            for param, partition in zip(params, partitions):
                param.data = partition
            self._writers = None

    def _weights_state(self) -> dict:
        """The sharded state dict of the weights (inside _weights_to_save): under ZeRO-3 each
        parameter's main replica is its writer's copy; a placeholder is never a main replica."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import is_main_replica

        state = model_sharded_state_dict([self.model])
        if self._writers is None:
            return state
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        for item in nested_values(state):
            data = getattr(item, "data", None)
            writer = self._writers.get(id(data))
            if writer is not None:
                # megatron's replica id ends with the DP rank; now 0 only on the writer, and
                # unique within the DP group.
                item.replica_id = (*tuple(item.replica_id)[:-1], (dp_rank - writer) % dp)
            elif data is not None and is_main_replica(item.replica_id) and _is_placeholder(data):
                raise RuntimeError(f"{item.key}: a ZeRO-3 placeholder would be saved as weights")
        return state

    def _layout(self) -> dict:
        zero = self.ds_config.get("zero_optimization", {})
        return {
            "zero_stage": zero.get("stage", 0),
            "offload_optimizer": _offloads_optimizer(self.ds_config),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        }

    def save(self, path: Path, background: bool = False) -> list:
        """DeepSpeed's checkpoint (weights, ZeRO optimizer partitions) in path/deepspeed, for
        exact resume at the same layout; the weights also in path/model, which conversion and
        any other layout or engine can read. Synchronous (validate refuses async_save)."""
        self.engine.save_checkpoint(str(path / "deepspeed"), tag=DS_TAG)
        if torch.distributed.get_rank() == 0:
            (path / "deepspeed" / DS_LAYOUT).write_text(json.dumps(self._layout()))
        with self._weights_to_save():
            save_sharded(self._weights_state(), path / "model")
        return []

    def load(self, path: Path, load_optimizer: bool) -> None:
        if load_optimizer:
            # DeepSpeed's partitions load only into the same ZeRO stage, offload and sizes.
            layout = path / "deepspeed" / DS_LAYOUT
            saved = json.loads(layout.read_text()) if layout.is_file() else None
            if saved != self._layout():
                raise ConfigError(
                    f"{path} holds DeepSpeed optimizer state for {saved}, which does not load at "
                    f"{self._layout()}: resume with the saved training.deepspeed_config and layout, "
                    "or load the weights with a fresh optimizer: --set checkpoint.load_optimizer=false"
                )
            self.engine.load_checkpoint(
                str(path / "deepspeed"), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            return
        if self._engine is not None:
            raise RuntimeError("load weights without the optimizer before the first step")
        load_model([self.model], path / "model")

