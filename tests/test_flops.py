"""FLOPs accounting against torch's FlopCounterMode on the real model's forward and backward.

FlopCounterMode counts matrix products (mm, addmm, bmm, baddbmm), convolutions (forward and
backward) and fused SDPA kernels, 2 FLOPs per multiply-add: the same scope as megatron_mm1.flops.
It counts what runs: megatron's DotProductAttention (the `local` spec used here) computes the
full s x s score matrix of every row and masks it afterwards, and every padding token goes
through every layer. So the like-for-like comparison is flops.train_flops over whole rows with
the local spec's arithmetic.kernel_pairs; the causal, padding-free figure the benchmark reports
is then checked separately against the mask the model is given, and so are the pairs the fast
spec's kernel computes (FlopCounterMode does not count the CPU's fused SDPA kernel).

One known miscount of FlopCounterMode is corrected, not tolerated: its convolution_backward
formula ignores `groups` for the weight gradient, so the C-Abstractor's depthwise 3x3 convs
(groups = channels) are counted C times too high there (torch/utils/flop_counter.py,
conv_backward_flop). `depthwise_overcount` computes that excess exactly.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_mm1 import arithmetic, flops
from megatron_mm1.config import load_config
from megatron_mm1.models.attention import attention_mask_from_segments, packed_segments
from megatron_mm1.models.mm1 import MM1Model
from megatron_mm1.synthetic import synthetic_microbatch

TOLERANCE = 0.03


pytestmark = pytest.mark.usefixtures("single_process_runtime")


def counted_step(cfg, batch) -> tuple[float, float]:
    """(whole model, vision encoder + connector) FLOPs that FlopCounterMode sees in one
    forward + backward of the real model."""
    torch.manual_seed(0)
    model = MM1Model(cfg)
    with FlopCounterMode(display=False) as whole:
        out = model(batch["tokens"], batch["segment_ids"],
                    images=batch["images"], labels=batch["labels"])
        (out.lm_loss * batch["loss_mask"]).sum().backward()
    with FlopCounterMode(display=False) as vision:
        model.connector(model.vision(batch["images"])).square().mean().backward()
    return whole.get_total_flops(), vision.get_total_flops()


def depthwise_overcount(cfg, num_images: int) -> float:
    """FlopCounterMode's excess on the depthwise convs' weight gradients: (C - 1) x the true
    2 x 9 x pixels x C x images of each."""
    c, v = cfg.model.connector, cfg.model.vision
    pixels = c.depth * (v.num_patches + c.num_image_tokens)  # stage 1 before pooling, stage 2 after
    return (c.hidden_size - 1) * 2.0 * 9 * pixels * c.hidden_size * num_images


@pytest.mark.parametrize("config", ["tiny", "tiny-moe"])
def test_train_flops_match_flop_counter(config):
    cfg = load_config(config)
    batch = synthetic_microbatch(cfg, seed=3, images_per_row=[2, 1])
    b, s = batch["tokens"].shape
    whole, vision = counted_step(cfg, batch)

    # Executed work: whole rows (padding included), the local spec's full s x s attention.
    expected = flops.train_flops(cfg, b * s, arithmetic.kernel_pairs(cfg, [s] * b), num_images=3)
    excess = depthwise_overcount(cfg, 3)
    assert abs(whole - excess - expected["total"]) / whole < TOLERANCE, (whole, expected)
    expected_vision = expected["patch_embed"] + expected["vision"] + expected["connector"] + excess
    assert abs(vision - expected_vision) / vision < TOLERANCE, (vision, expected_vision)
    assert expected_vision > 0.05 * expected["total"]  # the tiny vision side is not negligible


def test_moe_counts_router_and_top_k_experts_only():
    cfg = load_config("tiny-moe")
    dense = flops.forward_flops(load_config("tiny"), 100, 0, 0)["llm_linear"]
    moe = flops.forward_flops(cfg, 100, 0, 0)["llm_linear"]
    llm, e = cfg.model.llm, cfg.model.moe
    moe_layers = llm.num_layers // e.layer_freq
    per_token_extra = e.router_topk * 3 * llm.hidden_size * llm.ffn_hidden_size + llm.hidden_size * e.num_experts
    per_token_dense = 3 * llm.hidden_size * llm.ffn_hidden_size
    assert moe - dense == 2 * 100 * moe_layers * (per_token_extra - per_token_dense)


def test_reported_convention_is_causal_pairs_of_the_mask_without_padding():
    cfg = load_config("tiny")
    batch = synthetic_microbatch(cfg, seed=5, images_per_row=[1, 2])
    seg = batch["segment_ids"]
    lengths = flops.segment_lengths(seg)
    assert sum(lengths) == flops.batch_tokens(batch) == int((seg > 0).sum())
    assert len(lengths) == 4  # two packed samples per row

    # The pairs the mask allows among real tokens are exactly the causal count L(L+1)/2.
    allowed = ~attention_mask_from_segments(seg)[:, 0]
    real = (seg > 0)[:, :, None] & (seg > 0)[:, None, :]
    causal = flops.forward_flops(cfg, sum(lengths), arithmetic.causal_pairs(lengths), 3)
    llm, heads_dim = cfg.model.llm, cfg.model.llm.hidden_size
    pairs = causal["llm_attention"] / (4 * heads_dim * llm.num_layers)
    assert pairs == int((allowed & real).sum())

    # Reported (causal, no padding) < executed by the local spec (full rows): the difference is
    # exactly the masked half of attention plus the padding tokens' work.
    b, s = seg.shape
    full = flops.forward_flops(cfg, b * s, arithmetic.kernel_pairs(cfg, [s] * b), 3)
    per_token = (full["llm_linear"] + full["logits"]) / (b * s)
    gap = full["llm_attention"] - causal["llm_attention"] + per_token * (b * s - sum(lengths))
    assert sum(full.values()) - sum(causal.values()) == pytest.approx(gap, rel=1e-12)
    assert flops.batch_flops(cfg, batch) == flops.train_flops(cfg, sum(lengths), arithmetic.causal_pairs(lengths), 3)["total"]

    # The fast spec's kernel computes exactly the pairs the mask allows, one causal block per
    # run of the row (the trailing padding is a run of its own).
    runs = [n for row in packed_segments(seg).lengths for n in row]
    assert arithmetic.kernel_pairs(load_config("tiny", ["model.layer_spec=fast"]), runs) == int(allowed.sum())


def test_freezing_drops_weight_gradients():
    cfg = load_config("tiny")
    cfg.model.freeze_vision = cfg.model.freeze_connector = True
    mult = flops.backward_multipliers(cfg)
    assert mult["vision"] == mult["patch_embed"] == mult["connector"] == 1.0
    assert mult["llm_linear"] == 3.0
    cfg.model.freeze_llm = True
    assert set(flops.backward_multipliers(cfg).values()) == {1.0}
