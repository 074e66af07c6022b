"""The device audit: on the CPU stand-in, fail on what would break a CUDA/NCCL run.

Without CUDA every tensor lives in host memory, so a tensor left on the host cannot fail by
itself. With MM1_DEVICE_AUDIT=1 the stand-in (cpu_compat) keeps the two apart: a storage
made by a request for the device (`device=device()`, `.cuda()`, `.to("cuda")`, megatron's
`torch.cuda.current_device()`) or by an op on device tensors is a device storage; anything
else is host memory. This dispatch mode then raises DeviceMismatch where CUDA or NCCL would:

- an op mixes device tensors with host tensors (host 0-dim scalars excepted, as on CUDA);
- a collective on a device process group (not one created as gloo on purpose) gets a host
  tensor: NCCL's "No backend type associated with device type cpu";
- `.numpy()` of a device tensor (cpu_compat checks that one).

Parameters and buffers are checked where the model is built (device.check_placement).

How a new tensor's place is decided: a Python-level creation or transfer is classified by the
stand-in's function mode (`creating(...)`); an op with tensor inputs follows its inputs; a
tensor made with no tensor input inside an op or a backward pass follows the device, as the
tensors of a GPU run do. Only the first two can catch a mistake, which is where they happen.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import traceback
from typing import Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ENV = "MM1_DEVICE_AUDIT"
aten = torch.ops.aten

# Ops whose inputs may lie on both sides on CUDA: copies, and indexing with host indices.
_CROSS_DEVICE_OK = {
    aten.copy_.default,
    aten._to_copy.default,
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
# Collectives that synchronise rather than move the caller's data.
_NO_DATA_COLLECTIVES = {"barrier", "monitored_barrier_"}


class DeviceMismatch(RuntimeError):
    """A tensor on the wrong side for a CUDA/NCCL run."""


def requested() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


_active = False
_counts = {"ops": 0, "collectives": 0, "mismatches": 0}
_device_storages: dict[int, StorageWeakRef] = {}
_host_groups: list = []  # process groups created as gloo on purpose (megatron's *_GLOO groups)
_creation = threading.local()  # the place the stand-in chose for the Python-level call in flight


def active() -> bool:
    return _active


def is_device(t: torch.Tensor) -> bool:
    """True if `t` is on the run's device (always, when the audit is off)."""
    if not _active:
        return True
    key = _storage_key(t)
    if key is None:
        return True  # no storage of its own (a wrapper such as torch's ShardedTensor)
    ref = _device_storages.get(key)
    return ref is not None and not ref.expired()


def _storage_key(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _mark_device(t: torch.Tensor) -> None:
    if _storage_key(t) is None:
        return
    storage = t.untyped_storage()
    _device_storages[storage._cdata] = StorageWeakRef(storage)
    if len(_device_storages) % 4096 == 0:  # forget freed storages now and then
        for key in [k for k, ref in _device_storages.items() if ref.expired()]:
            del _device_storages[key]


@contextlib.contextmanager
def creating(on_device: Optional[bool]) -> Iterator[None]:
    """Tensors made by the ops inside are on the device (True) or the host (False); None leaves
    them to the inputs."""
    previous = getattr(_creation, "on_device", None)
    _creation.on_device = on_device
    try:
        yield
    finally:
        _creation.on_device = previous


def _describe(t: torch.Tensor) -> str:
    return f"{'device' if is_device(t) else 'HOST'} {t.dtype} {tuple(t.shape)}"


def fail(message: str) -> None:
    _counts["mismatches"] += 1
    # The innermost frames of our own code say where the mistake is.
    frames = [f for f in traceback.extract_stack()[:-2]
              if "megatron_mm1" in f.filename and not f.filename.endswith(("device_audit.py", "cpu_compat.py"))]
    where = "outside megatron_mm1"
    if frames:
        path = frames[-1].filename
        where = f"{path[path.rindex('megatron_mm1'):]}:{frames[-1].lineno}"
    raise DeviceMismatch(f"device audit: {message} (at {where})")


def _check_collective(func, args) -> None:
    _counts["collectives"] += 1
    name = func.__name__.split(".")[0]
    if name in _NO_DATA_COLLECTIVES:
        return
    groups = [torch.distributed.ProcessGroup.unbox(a) for a in args
              if isinstance(a, torch.ScriptObject) and a._type().name() == "ProcessGroup"]
    if any(g in _host_groups for g in groups):
        return
    host = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and not is_device(t)]
    if host:
        fail(
            f"collective {name} on host tensor(s) {', '.join(_describe(t) for t in host)}: NCCL refuses "
            "them ('No backend type associated with device type cpu'); make them with device=device()"
        )


class DeviceAudit(TorchDispatchMode):
    """Tracks device storages through every op and refuses mixed-device ops and host collectives."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _counts["ops"] += 1
        if func.namespace == "c10d":
            _check_collective(func, args)
            return func(*args, **kwargs)
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        creating = getattr(_creation, "on_device", None)
        on_device = creating if creating is not None else self._output_on_device(func, inputs, kwargs)
        out = func(*args, **kwargs)
        if on_device:
            # Views and in-place results share an input's storage, which keeps its place; a
            # creation's results are all new (torch.tensor's lift_fresh returns its input).
            taken = set() if creating else {_storage_key(t) for t in inputs}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and _storage_key(t) not in taken:
                    _mark_device(t)
        return out

    @staticmethod
    def _output_on_device(func, inputs: list[torch.Tensor], kwargs: dict) -> bool:
        device = kwargs.get("device")
        if isinstance(device, torch.device) and device.type == "cpu" and device.index == 0:
            return True  # the stand-in device, asked for by name
        inputs = [t for t in inputs if not t.is_meta]  # no data: no place
        if not inputs:
            return True  # made inside an op or a backward pass: follows the device
        places = [is_device(t) for t in inputs]
        if any(places) and not all(places) and func not in _CROSS_DEVICE_OK:
            host = [t for t, d in zip(inputs, places) if not d and t.dim() > 0]
            if host:
                fail(
                    f"{func} mixes device tensors with host tensor(s) {', '.join(_describe(t) for t in host)}; "
                    "on CUDA it fails with 'Expected all tensors to be on the same device'"
                )
        return any(places)


def enable() -> None:
    """Start the audit for the life of the process (CPU stand-in only; cpu_compat calls this)."""
    global _active
    if _active:
        return
    _record_host_groups()
    _object_collectives_on_device()
    DeviceAudit().__enter__()
    atexit.register(_report)
    _active = True


def _report() -> None:
    rank = os.environ.get("RANK", "0")
    print(f"device audit (rank {rank}): {_counts['ops']} ops and {_counts['collectives']} collectives "
          f"checked, {_counts['mismatches']} device mismatches", file=sys.stderr, flush=True)


def _object_collectives_on_device() -> None:
    """Object collectives (all_gather_object, broadcast_object_list, ...) stage their bytes on
    the group's device: the GPU on NCCL groups, which the audit's gloo groups stand in for."""
    from torch.distributed import distributed_c10d

    distributed_c10d._get_object_coll_device = lambda group=None: "cpu" if group in _host_groups else "cpu:0"


def _record_host_groups() -> None:
    """Groups created with backend='gloo' are host groups on a GPU run too (megatron keeps some
    for host-side checkpoint work); every other group is NCCL there."""
    new_group = torch.distributed.new_group

    def recording_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if backend is not None and str(backend).lower() == "gloo":
            _host_groups.append(group)
        return group

    torch.distributed.new_group = recording_new_group
