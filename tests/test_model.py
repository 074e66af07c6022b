"""The MM1 model in one process: image placement, loss on text only, packed-sample isolation,
freezing, z-loss and clear errors."""

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_mm1.config import load_config
from megatron_mm1.models.mm1 import MM1Model
from megatron_mm1.runtime import init_runtime
from megatron_mm1.synthetic import synthetic_microbatch


@pytest.fixture(scope="module")
def cfg():
    from megatron.core import parallel_state

    cfg = load_config("tiny")
    if not parallel_state.model_parallel_is_initialized():
        init_runtime(cfg)
    return cfg


def make_model(cfg, **model_overrides):
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(0)  # the plain torch modules' initialisation
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # megatron's layers'
    return MM1Model(cfg).eval()


def test_image_embeddings_land_on_placeholders(cfg):
    model = make_model(cfg)
    batch = synthetic_microbatch(cfg, seed=1, images_per_row=[2, 1])
    tokens, images = batch["tokens"], batch["images"]
    with torch.no_grad():
        embedded = model.embed(tokens, images).transpose(0, 1)  # [b, s, h]
        image_tokens = model.connector(model.vision(images))  # [3, N, h]
        text = model.llm.embedding.word_embeddings(tokens)
    is_image = tokens == cfg.model.image_token_id
    n = cfg.model.connector.num_image_tokens
    assert int(is_image.sum()) == 3 * n
    # Row-major order of the placeholders is the images' order, N tokens each.
    torch.testing.assert_close(embedded[is_image], image_tokens.reshape(-1, image_tokens.shape[-1]))
    torch.testing.assert_close(embedded[~is_image], text[~is_image])


def test_loss_ignores_image_and_padding_targets(cfg):
    model = make_model(cfg)
    batch = synthetic_microbatch(cfg, seed=2, images_per_row=[2, 2])
    with torch.no_grad():
        out = model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"])
    image_targets = batch["labels"] == cfg.model.image_token_id
    assert image_targets.any()
    assert (out.lm_loss[image_targets] == 0).all()
    assert (out.lm_loss[~image_targets] > 0).all()
    # The data's loss mask excludes image and padding targets.
    assert (batch["loss_mask"][image_targets] == 0).all()
    assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()


def image_owners(tokens, segment_ids, image_token_id, n):
    """(row, segment) of each image: image k fills the k-th N placeholders in row-major order."""
    rows, cols = (tokens == image_token_id).nonzero(as_tuple=True)
    return [(int(r), int(segment_ids[r, c])) for r, c in zip(rows[::n], cols[::n])]


@pytest.fixture(params=["local", "fast"])
def spec(cfg, request):
    cfg.model.layer_spec = request.param
    yield request.param
    cfg.model.layer_spec = "local"


def test_packed_samples_do_not_attend_to_each_other(cfg, spec):
    model = make_model(cfg)
    batch = synthetic_microbatch(cfg, seed=8, images_per_row=[2, 2])  # an image in each sample
    tokens, images, seg = batch["tokens"].clone(), batch["images"].clone(), batch["segment_ids"]
    owners = image_owners(tokens, seg, cfg.model.image_token_id, cfg.model.connector.num_image_tokens)
    # Change the FIRST sample of row 0: causality alone would not shield the second from it.
    target = (0, 1)
    assert target in owners, "the test needs an image in the changed sample"

    def logits(tokens, images):
        with torch.no_grad():
            return model(tokens, seg, images=images)

    base = logits(tokens, images)
    text = (seg[0] == 1) & (tokens[0] != cfg.model.image_token_id)
    tokens[0, text] = cfg.model.image_token_id + 1 + (tokens[0, text] + 7) % 100
    for k, owner in enumerate(owners):
        if owner == target:
            images[k] += 1.0
    changed = logits(tokens, images)

    assert not torch.allclose(changed[0, seg[0] == 1], base[0, seg[0] == 1])
    torch.testing.assert_close(changed[0, seg[0] == 2], base[0, seg[0] == 2], rtol=0, atol=0)
    torch.testing.assert_close(changed[1], base[1], rtol=0, atol=0)


def test_freeze_switches(cfg):
    model = make_model(cfg, freeze_vision=True, freeze_connector=False, freeze_llm=True)
    try:
        assert not any(p.requires_grad for p in model.vision.parameters())
        assert all(p.requires_grad for p in model.connector.parameters())
        assert not any(p.requires_grad for p in model.llm.parameters())
    finally:
        cfg.model.freeze_vision = cfg.model.freeze_llm = False


def test_logits_z_loss(cfg):
    model = make_model(cfg, logits_z_loss_coeff=1e-3)
    try:
        batch = synthetic_microbatch(cfg, seed=4, images_per_row=[1, 0])
        with torch.no_grad():
            out = model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"])
            logits = model(batch["tokens"], batch["segment_ids"], images=batch["images"])
        expected = 1e-3 * torch.logsumexp(logits.float(), dim=-1).square()
        torch.testing.assert_close(out.z_loss, expected)
    finally:
        cfg.model.logits_z_loss_coeff = 0.0


def test_image_count_mismatch_is_a_clear_error(cfg):
    model = make_model(cfg)
    batch = synthetic_microbatch(cfg, seed=5, images_per_row=[2, 1])
    with pytest.raises(ValueError, match="<image> tokens"):
        model.embed(batch["tokens"], batch["images"][:2])
    with pytest.raises(ValueError, match="no images"):
        model.embed(batch["tokens"], batch["images"][:0])


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_gives_the_same_gradients(cfg, mode, spec):
    batch = synthetic_microbatch(cfg, seed=6, images_per_row=[1, 2])

    def grads(recompute):
        cfg.training.recompute_llm = cfg.training.recompute_vision = recompute
        try:
            model = make_model(cfg).train()
        finally:
            cfg.training.recompute_llm = cfg.training.recompute_vision = "none"
        out = model(batch["tokens"], batch["segment_ids"], images=batch["images"], labels=batch["labels"])
        (out.lm_loss * batch["loss_mask"]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads("none"), grads(mode)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)
