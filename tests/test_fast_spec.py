"""The `fast` layer spec (SDPA core attention by packed sample) equals the `local` one (a dense
block-diagonal causal mask): same weights give the same logits, loss and gradients, dense and MoE,
with packed samples, padding, text-only rows and images, in one process and at TP2 with sequence
parallelism (this file is also the torchrun worker).

The same holds with the `fast` layers packed as THD, the `te` spec's packing (the rows flattened
to one, megatron's THD rotary embedding): all of the `te` spec's data path but TE's kernels.

  torchrun --nproc-per-node 2 tests/test_fast_spec.py
"""

import sys

import pytest
import torch
from megatron.core import parallel_state

from megatron_mm1.config import load_config
from megatron_mm1.models.experts import as_sequential
from megatron_mm1.models.mm1 import MM1Model
from megatron_mm1.runtime import init_runtime
from megatron_mm1.synthetic import synthetic_microbatch

TP2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]


def step(model, batch):
    """Logits, masked-mean loss and every gradient of one forward/backward."""
    model.zero_grad()
    out = model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"])
    loss = (out.lm_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["segment_ids"], images=batch["images"])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if getattr(p, "sequence_parallel", False):
            # A TP rank's share of the sequence differs between the [s, b] and THD layouts; the
            # sum over TP (finalize_model_grads' all-reduce) does not.
            torch.distributed.all_reduce(grads[n], group=parallel_state.get_tensor_model_parallel_group())
    return logits, loss.detach(), grads


def batches(cfg) -> list[dict]:
    """Two packed samples and padding per row; one sample and padding, a text-only row; one
    sample filling each row (the fast spec's plain causal kernel)."""
    packed = synthetic_microbatch(cfg, seed=11, images_per_row=[2, 1])
    assert packed["segment_ids"].unique().numel() == 3
    single = synthetic_microbatch(cfg, seed=12, images_per_row=[0, 1], samples_per_row=1)
    full = synthetic_microbatch(cfg, seed=13, images_per_row=[1, 0], samples_per_row=1)
    full["segment_ids"].fill_(1)
    return [packed, single, full]


def compare(config: str, overrides: list[str], packing: str = "sbhd") -> None:
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    local = MM1Model(cfg)
    cfg.model.layer_spec = "fast"
    fast = MM1Model(cfg)
    fast.packing = packing
    # `fast` stacks the MoE experts' weights (models/experts.py); as_sequential names them as `local`.
    local.load_state_dict(as_sequential(fast.state_dict()))
    attention = {type(m).__name__ for m in fast.modules()}
    assert "SDPAttention" in attention and "DotProductAttention" not in attention
    for batch in batches(cfg):
        ref, got = step(local, batch), step(fast, batch)
        got = (*got[:2], as_sequential(got[2]))
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1])
        assert got[2].keys() == ref[2].keys() and len(ref[2]) == len(list(local.parameters()))
        for name in ref[2]:
            torch.testing.assert_close(got[2][name], ref[2][name], msg=lambda m: f"{name}: {m}")


pytestmark = pytest.mark.usefixtures("single_process_runtime")


def test_fast_equals_local_one_process():
    compare("tiny", [])
    compare("tiny-moe", [])


def test_fast_packed_as_thd_equals_local_one_process():
    compare("tiny", [], packing="thd")
    compare("tiny-moe", [], packing="thd")


def test_fast_equals_local_at_tp2():
    from conftest import torchrun

    proc = torchrun(2, "tests/test_fast_spec.py", timeout=300)
    assert proc.stdout.count("FAST_SPEC_OK") == 2, proc.stdout


if __name__ == "__main__":
    from megatron_mm1.runtime import quiet_third_party_warnings, shutdown

    quiet_third_party_warnings()
    init_runtime(load_config("tiny", TP2))
    for packing in ("sbhd", "thd"):
        compare("tiny", TP2, packing)
        compare("tiny-moe", TP2, packing)
    print("FAST_SPEC_OK", torch.distributed.get_rank())
    shutdown()
    sys.exit(0)
