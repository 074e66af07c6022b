"""The whole CPU adaptation of megatron-core 0.16.1, in one place; active only without CUDA.

megatron-core assumes CUDA in a handful of places (see ../shared/notes/cpu-megatron-core.md).
`enable()` works around each, so that tests run real TP/PP/EP on gloo and users can dry-run a
cluster layout on a laptop. It is never called when CUDA is available.

Device requests land on STAND_IN, the CPU's stand-in for this process's GPU; with
MM1_DEVICE_AUDIT=1 the device audit (device_audit.py) also keeps device and host tensors apart
and fails on what would break a CUDA/NCCL run.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from megatron_mm1 import device_audit

_enabled = False

# The CPU stand-in for this process's GPU. CPU tensors all report `cpu`, but aten passes a
# requested `cpu:0` through unchanged, so the device audit can tell requests for the device
# from host allocations.
STAND_IN = torch.device("cpu", 0)
HOST = torch.device("cpu")


def _is_device_request(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA device
    if isinstance(device, str):
        device = torch.device(device) if device.startswith(("cuda", "cpu")) else None
    return isinstance(device, torch.device) and (device.type == "cuda" or device == STAND_IN)


_FACTORIES = _device_constructors()
_NEW_METHODS = {getattr(torch.Tensor, name) for name in
                ("new_tensor", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full")}


class CudaAsCpu(TorchFunctionMode):
    """Maps device='cuda', .cuda() and .to('cuda') to the stand-in device and reports tensors'
    .type() as CUDA: megatron's DDP, optimizer and schedules allocate on and assert CUDA.

    Under the device audit it also decides where each Python-level creation or transfer lands
    (device or host), reports device tensors' `.device` as the stand-in, makes `.cpu()` of a
    device tensor a copy, and refuses `.numpy()` of one, as CUDA does.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:  # .cuda(device=None, non_blocking=False, ...)
            kwargs.pop("device", None)
            func, args = torch.Tensor.to, (args[0], STAND_IN, *args[2:])
        if func is torch.Tensor.to or func is torch.Tensor.cpu:
            return _transfer(func, args, kwargs)
        if _is_device_request(kwargs.get("device")):
            kwargs["device"] = STAND_IN
        if not device_audit.active():
            return func(*args, **kwargs)
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the property getter
            real = func(*args)
            if real.type != "cpu":  # meta
                return real
            return STAND_IN if device_audit.is_device(args[0]) else HOST
        if func is torch.Tensor.numpy and device_audit.is_device(args[0]):
            device_audit.fail("numpy() of a device tensor: CUDA refuses it; use .cpu() first")
        if func in _FACTORIES:
            on_device = kwargs.get("device") == STAND_IN
        elif func in _NEW_METHODS:
            device = kwargs.get("device")
            on_device = device_audit.is_device(args[0]) if device is None else device == STAND_IN
        else:
            return func(*args, **kwargs)
        with device_audit.creating(on_device):
            return func(*args, **kwargs)


def _transfer(func, args, kwargs):
    """Tensor.to / .cpu: a move to the device keeps a device tensor as it is (as on a GPU); a
    host tensor is copied to the device. Under the audit a move to the host copies."""
    tensor, copy = args[0], kwargs.pop("copy", False)
    if func is torch.Tensor.cpu:
        target, dtype, non_blocking, memory_format = HOST, None, False, kwargs.get("memory_format")
    elif len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): other's place
        target = STAND_IN if device_audit.is_device(args[1]) else HOST
        dtype, non_blocking, memory_format = args[1].dtype, kwargs.get("non_blocking", False), None
    else:
        target, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
    options = {"non_blocking": non_blocking, "copy": copy}
    options.update({k: v for k, v in (("dtype", dtype), ("memory_format", memory_format)) if v is not None})
    to_device = _is_device_request(target)
    if target is None or to_device == device_audit.is_device(tensor) or not device_audit.active():
        return torch.Tensor.to(tensor, **options)  # stays where it is (no copy), as on a GPU
    options["copy"] = True
    with device_audit.creating(to_device):
        return torch.Tensor.to(tensor, STAND_IN if to_device else HOST, **options)


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
    # Returned as a device so `device=torch.cuda.current_device()` allocates on the stand-in,
    # also in backward passes, where the TorchFunctionMode below is not active.
    torch.cuda.current_device = lambda: STAND_IN
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
    # Its forks then change the CPU generator on purpose; megatron warns at every fork.
    logging.getLogger(random.__name__).setLevel(logging.ERROR)
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
                setattr(self, name, value.cpu().numpy())
        return tokens_per_expert

    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh


def _patch_deepspeed() -> None:
    """DeepSpeed's CPU accelerator names its device `cpu`, which is host memory; name the
    stand-in, so that DeepSpeed allocates where the model is, as on a GPU."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = type(get_accelerator())
    accelerator.device_name = lambda self, device_index=None: str(STAND_IN)
    accelerator.current_device_name = lambda self: str(STAND_IN)
    # Its CPU backend compiles a shared-memory all-reduce at start-up (a minute of g++ per fresh
    # machine) that only inference_all_reduce uses; training reduces through gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def enable(cfg) -> None:
    """Apply every CPU workaround `cfg` needs, once. Only valid without CUDA."""
    global _enabled
    assert not torch.cuda.is_available(), "the CPU adaptation must not run with CUDA"
    if cfg.training.engine == "deepspeed":
        _patch_deepspeed()
    if _enabled:
        return
    _patch_torch_cuda()
    _patch_rng()
    _patch_moe()
    if device_audit.requested():
        device_audit.enable()
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
