"""The run's device. Every tensor that meets the model or a collective is made on `device()`.

On a GPU that is this process's CUDA device (init_runtime sets it from LOCAL_RANK). Without
CUDA it is cpu_compat's stand-in for one, where the device audit (MM1_DEVICE_AUDIT=1) can
tell it from host memory.
"""

from __future__ import annotations

from itertools import chain
from typing import Iterable

import torch


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    from megatron_mm1.cpu_compat import STAND_IN

    return STAND_IN


def on_device(t: torch.Tensor) -> bool:
    if torch.cuda.is_available():
        return t.device == device()
    from megatron_mm1 import device_audit

    return device_audit.is_device(t)


def to_device(batch: dict) -> dict:
    """A micro-batch's tensors on the device, copied without blocking (asynchronous from the
    loader's pinned memory); other values as they are."""
    target = device()
    return {k: v.to(target, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def synchronize() -> None:
    """Wait for the device's queued work (timings)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_placement(modules: Iterable[torch.nn.Module]) -> None:
    """Refuse a model with any parameter or buffer (frozen ones included) off the device."""
    host = [
        name
        for module in modules
        for name, t in chain(module.named_parameters(), module.named_buffers())
        if not on_device(t)
    ]
    if host:
        shown = ", ".join(host[:8]) + (f" and {len(host) - 8} more" if len(host) > 8 else "")
        where = str(device()) if torch.cuda.is_available() else f"{device()} (the CPU stand-in for the GPU)"
        raise RuntimeError(f"{len(host)} parameters/buffers are not on {where}: {shown}")
