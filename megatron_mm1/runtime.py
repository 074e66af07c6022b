"""Process start-up: rank and world from torchrun's or Slurm's environment, the process group
(nccl on GPU, gloo on CPU), megatron-core's parallel state and RNG."""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from megatron_mm1.config import Config, ConfigError, ParallelConfig, validate


COLLECTIVE_TIMEOUT_MARGIN_S = 60.0
# Under srun without torchrun: every process must reach MASTER_ADDR:MASTER_PORT within this.
RENDEZVOUS_TIMEOUT_ENV = "MM1_RENDEZVOUS_TIMEOUT_S"
EXIT_RENDEZVOUS_TIMEOUT = 124  # as timeout(1)


class RendezvousTimeout(Exception):
    """Not every process of the run arrived at the rendezvous in time."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def quiet_third_party_warnings() -> None:
    """megatron-core and DeepSpeed warn on every import and layer about optional packages
    (apex, TransformerEngine) and upcoming API changes; operators need none of it."""
    if os.environ.get("MM1_SHOW_WARNINGS"):
        return
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def dist_env() -> DistEnv:
    """Rank/world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm (SLURM_PROCID, ...);
    a single process when neither is set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError(
                "under srun without torchrun, MASTER_ADDR and MASTER_PORT must be set "
                "(the slurm/ templates derive them from the allocation)"
            )
        return DistEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return DistEnv(0, 1, 0)


def _slurm_store(env: DistEnv) -> torch.distributed.TCPStore:
    """The store that srun's processes meet at, hosted by rank 0. A process that does not arrive
    within $MM1_RENDEZVOUS_TIMEOUT_S (default 600; a node that never started, a port that cannot
    be reached) fails the run then, not after the collective timeout."""
    timeout = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV, 600))
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        return torch.distributed.TCPStore(host, port, env.world_size, is_master=env.rank == 0,
                                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=True)
    except RuntimeError as e:  # torch's DistStoreError / DistNetworkError
        raise RendezvousTimeout(
            f"rendezvous timeout: not all {env.world_size} processes joined {host}:{port} within "
            f"{timeout:g} s ({RENDEZVOUS_TIMEOUT_ENV}); a node did not start its processes, or cannot "
            f"reach the first node on that port ({str(e).splitlines()[0]})"
        ) from None


def init_runtime(cfg: Config) -> DistEnv:
    """Validate `cfg` for this world size, then start torch.distributed and megatron-core. A
    collective fails after training.hang_timeout_s + COLLECTIVE_TIMEOUT_MARGIN_S: in the
    training loop the hang watchdog fires first and dumps the stacks; the timeout covers what
    precedes the loop."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_mm1.launch import children_die_with_this_process
    from megatron_mm1.models.te_spec import check_runs

    env = dist_env()
    validate(cfg, world_size=env.world_size)  # before any process group or device memory
    check_runs(cfg)
    children_die_with_this_process()
    collective_timeout_s = cfg.training.hang_timeout_s + COLLECTIVE_TIMEOUT_MARGIN_S
    if torch.cuda.is_available():
        set_cuda_environment(cfg)
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        from megatron_mm1 import cpu_compat

        cpu_compat.check_layout(cfg)
        cpu_compat.enable(cfg)
        backend = "gloo"
    if not torch.distributed.is_initialized():
        store = None  # torchrun's, or env:// at MASTER_ADDR:MASTER_PORT (`mm1 train --nproc`)
        if env.world_size == 1:
            store = torch.distributed.HashStore()  # a single process needs no rendezvous (no port)
        elif "RANK" not in os.environ:
            store = _slurm_store(env)
        torch.distributed.init_process_group(
            backend,
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        distributed_timeout_minutes=collective_timeout_s / 60,
    )
    torch.manual_seed(cfg.training.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.training.seed)
    if cfg.training.deterministic:
        # warn_only: a few CUDA kernels (adaptive pooling's backward) have no deterministic form.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return env


def set_cuda_environment(cfg: Config) -> None:
    """Set what CUDA reads when it starts: call before anything touches the GPU (init_runtime
    does; a launcher that queries the GPU first calls it earlier).

    - With tensor or context parallelism, CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue
      keeps kernels in issue order, so a collective queued ahead of a GEMM overlaps with it
      (megatron's requirement).
    - With training.deterministic, CUBLAS_WORKSPACE_CONFIG=:4096:8: cuBLAS is reproducible
      only with a fixed workspace."""
    p = cfg.parallel
    wanted = {}
    if max(p.tensor_model_parallel_size, p.context_parallel_size) > 1:
        wanted["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if cfg.training.deterministic:
        wanted["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    for name, value in wanted.items():
        if os.environ.get(name) == value:
            continue
        if torch.cuda.is_initialized():
            print(f"WARNING: CUDA started before {name}={value} could be set; set it in the job's "
                  "environment", file=sys.stderr)
            continue
        os.environ[name] = value


def shutdown() -> None:
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    # MoE losses are logged per layer in a global sized by the first model that logs; the next
    # runtime's model may have more layers.
    get_moe_layer_wise_logging_tracker().clear()


def single_process(cfg: Config) -> Config:
    """Start megatron-core in this process alone at TP = PP = EP = 1 (model building on the
    meta device, conversion, parameter counts) and return that config."""
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    restart(cfg)
    return cfg


def restart(cfg: Config) -> DistEnv:
    """init_runtime after ending an earlier start in this process, if any: its process groups,
    not only megatron's view of them (every gloo group keeps threads of its own until destroyed)."""
    shutdown()
    return init_runtime(cfg)
