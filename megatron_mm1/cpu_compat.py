"""The whole CPU adaptation of megatron-core 0.16.1, in one place; active only without CUDA.

megatron-core assumes CUDA in a handful of places (see ../shared/notes/cpu-megatron-core.md).
`enable()` works around each, so that tests run real TP/PP/EP on gloo and users can dry-run a
cluster layout on a laptop. It is never called when CUDA is available.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _is_cuda(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA device
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaAsCpu(TorchFunctionMode):
    """Maps device='cuda', .cuda() and .to('cuda') to the CPU and reports CPU tensors' .type()
    as CUDA: megatron's DDP, optimizer and schedules allocate on and assert CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args):
        return self

    def __eq__(self, other):
        return isinstance(other, _NoStream)

    def __hash__(self):
        return 0


_CPU_STREAM = _NoStream()


def _patch_torch_cuda() -> None:
    # Returned as a device so `device=torch.cuda.current_device()` allocates on the CPU, also in
    # backward passes, where the TorchFunctionMode below is not active.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.record_stream = lambda self, stream: None


def _patch_rng() -> None:
    """megatron's RNG tracker and activation checkpointing save and restore CUDA generator
    states; use the CPU generator's."""
    from megatron.core.tensor_parallel import random

    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def _patch_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # 0.16.1 references te_general_gemm without TransformerEngine (NameError).
    moe_utils.te_general_gemm = None

    # The alltoall dispatcher moves split sizes to the host on a side CUDA stream and passes
    # them as tensors; gloo's all_to_all_single needs Python/numpy sizes.
    original = token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize

    def dtoh(self, point, tokens_per_expert=None):
        tokens_per_expert = original(self, point, tokens_per_expert)
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.numpy())
        return tokens_per_expert

    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh


def enable() -> None:
    """Apply every CPU workaround once. Only valid without CUDA."""
    global _enabled
    if _enabled:
        return
    assert not torch.cuda.is_available(), "the CPU adaptation must not run with CUDA"
    _patch_torch_cuda()
    _patch_rng()
    _patch_moe()
    CudaAsCpu().__enter__()  # for the life of the process
    _enabled = True


def transformer_config_overrides() -> dict:
    """TransformerConfig settings that gloo needs; none with CUDA."""
    if torch.cuda.is_available():
        return {}
    # gloo matches messages between two ranks in posting order; megatron's batched p2p posts
    # forward and backward tensors in orders that cross when PP=2 with virtual stages.
    return {"batch_p2p_comm": False}


def check_layout(cfg) -> None:
    """Refuse, before start-up, layouts that megatron-core cannot run over gloo."""
    from megatron_mm1.config import ConfigError

    p, moe = cfg.parallel, cfg.model.moe
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    ep = p.expert_model_parallel_size
    if moe.num_experts and ep > 1 and etp > 1 and moe.token_dispatcher == "alltoall":
        raise ConfigError(
            f"on CPU (gloo), expert parallelism {ep} with expert tensor parallelism {etp} and the "
            "alltoall dispatcher needs an uneven all-gather that gloo lacks: set "
            "parallel.expert_tensor_parallel_size=1 or model.moe.token_dispatcher=allgather"
        )
