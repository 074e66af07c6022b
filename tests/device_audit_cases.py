"""The device audit's own cases, in one process under MM1_DEVICE_AUDIT=1 (tests/test_device_audit.py
runs it): each mistake a CUDA/NCCL run would die of is refused, and the correct forms pass.
Prints one line per case; exits non-zero at the first case that behaves otherwise."""

import os

import pytest
import torch

from megatron_mm1.config import load_config
from megatron_mm1.device import check_placement, device
from megatron_mm1.device_audit import DeviceMismatch, is_device
from megatron_mm1.models.mm1 import MM1Model, build_model
from megatron_mm1.runtime import init_runtime
from megatron_mm1.synthetic import synthetic_microbatch

CFG = load_config("tiny")

CASES = []


def case(fn):
    CASES.append(fn)
    return fn


@case
def collective_on_host_tensor_is_refused():
    with pytest.raises(DeviceMismatch, match="collective allreduce_ on host tensor"):
        torch.distributed.all_reduce(torch.tensor([1.0]))


@case
def collective_on_device_tensor_passes():
    t = torch.tensor([1.0], device=device())
    torch.distributed.all_reduce(t)
    assert is_device(t)


@case
def gloo_group_takes_host_tensors():
    group = torch.distributed.new_group([0], backend="gloo")  # as megatron's *_GLOO groups
    torch.distributed.all_reduce(torch.tensor([1.0]), group=group)


@case
def object_collectives_stage_on_the_device():
    gathered = [None]
    torch.distributed.all_gather_object(gathered, {"step": 3})
    assert gathered == [{"step": 3}]


@case
def mixed_op_is_refused_but_host_scalars_pass():
    on_device = torch.ones(3, device=device())
    with pytest.raises(DeviceMismatch, match="mixes device tensors with host"):
        on_device + torch.ones(3)
    assert is_device(on_device * torch.tensor(2.0))  # a 0-dim host tensor, as CUDA allows


@case
def transfers_change_place():
    host = torch.ones(3)
    moved = host.to(device(), non_blocking=True)
    assert is_device(moved) and not is_device(host)
    assert moved.to(device()) is moved and moved.cuda() is moved  # already there: no copy
    back = moved.cpu()
    assert not is_device(back) and back is not moved
    with pytest.raises(DeviceMismatch):
        moved + back


@case
def numpy_of_a_device_tensor_is_refused():
    with pytest.raises(DeviceMismatch, match="numpy"):
        torch.ones(2, device=device()).numpy()
    torch.ones(2, device=device()).cpu().numpy()


@case
def derived_tensors_follow_their_inputs():
    x = torch.randn(4, 4, device=device())
    assert all(is_device(t) for t in (x.T, x @ x, torch.zeros_like(x), x.new_zeros(2), x.sum(), x.double()))
    assert torch.empty(2, device=x.device).device == x.device  # `device=x.device` stays on the device
    assert not is_device(torch.zeros(2)) and not is_device(x.new_zeros(2, device="cpu"))


@case
def tensors_made_in_backward_follow_the_device():
    class MadeInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return torch.empty(grad.shape).fill_(2.0) * grad  # no device named, as megatron's do

    x = torch.ones(3, device=device(), requires_grad=True)
    MadeInBackward.apply(x).sum().backward()
    assert is_device(x.grad)


@case
def a_module_left_on_the_host_is_refused():
    model = MM1Model(CFG)  # built without the device as default: plain torch parts stay on the host
    with pytest.raises(RuntimeError, match=r"are not on .*vision\.conv1\.weight"):
        check_placement([model])
    batch = {k: v.to(device()) for k, v in synthetic_microbatch(CFG, 0, [1, 0]).items()}
    with pytest.raises(DeviceMismatch, match="mixes device tensors with host"):
        model(batch["tokens"], batch["segment_ids"], images=batch["images"],
              labels=batch["labels"])


@case
def build_model_places_everything_on_the_device():
    (model,) = build_model(CFG)  # check_placement inside
    frozen = dict(model.named_parameters())["vision.conv1.weight"]
    assert is_device(frozen) and all(is_device(b) for b in model.buffers())


@case
def every_packing_runs_on_the_device():
    """The `fast` layers with their packing by row, and with the `te` spec's THD packing (the
    rows flattened, megatron's THD rotary embedding): no host tensor meets the model's."""
    cfg = load_config("tiny", ["model.layer_spec=fast"])
    (model,) = build_model(cfg)
    batch = {k: v.to(device()) for k, v in synthetic_microbatch(cfg, 0, [1, 2]).items()}
    for packing in ("sbhd", "thd"):
        model.packing = packing
        out = model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"])
        out.lm_loss.sum().backward()
        assert is_device(out.lm_loss) and out.lm_loss.shape == batch["tokens"].shape


if __name__ == "__main__":
    os.environ["MM1_DEVICE_AUDIT"] = "1"
    init_runtime(CFG)
    for fn in CASES:
        fn()
        print(f"ok {fn.__name__}", flush=True)
    print(f"{len(CASES)} device audit cases passed")
