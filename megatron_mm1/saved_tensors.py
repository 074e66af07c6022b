"""What autograd keeps for backward, measured: the bytes of the tensors saved while a forward
runs, attributed to the submodule that saved them. Checks the planner's activation model
(tests/test_planner.py) and shows what each fast-spec op saves (tools/bench_fast_ops.py)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def saved_bytes(modules: Sequence[torch.nn.Module], run: Callable[[], object]) -> list[dict[str, int]]:
    """Bytes of the tensors autograd saves while `run()` runs, per module of `modules` and by
    its child module that saves them. Each storage counts once, at the first module that saves
    it (a tensor shared by all layers belongs to the first); parameters do not count."""
    where: list = [None]
    hooks = []
    for i, module in enumerate(modules):
        for name, child in module.named_children():
            hooks.append(child.register_forward_pre_hook(lambda m, a, at=(i, name): where.__setitem__(0, at)))
            hooks.append(child.register_forward_hook(lambda m, a, o: where.__setitem__(0, None)))
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    first_saved: dict[int, tuple[int, str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if where[0] and storage.data_ptr() not in params:
            first_saved.setdefault(storage.data_ptr(), (*where[0], storage.nbytes()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    result: list[dict[str, int]] = [{} for _ in modules]
    for i, name, nbytes in first_saved.values():
        result[i][name] = result[i].get(name, 0) + nbytes
    return result
