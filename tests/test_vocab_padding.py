"""The padded vocabulary (`model.llm.make_vocab_size_divisible_by`): validated against TP; the
model computes exactly as an unpadded one (loss, z-loss, gradients, generation's choice); an odd
vocabulary trains at TP2 as in one process; Hugging Face models with such a vocabulary import and
export without the padding, bit for bit."""

import json
import sys

import pytest
import torch
from conftest import run, torchrun

from megatron_mm1.config import ConfigError, load_config, validate

VOCAB = 1023  # padded to 1024 by the default multiple, 128
ODD = [f"model.llm.vocab_size={VOCAB}", "training.bf16=false"]


def test_padding_is_validated_against_tp():
    cfg = load_config("tiny", [*ODD, "parallel.tensor_model_parallel_size=2"])
    validate(cfg, world_size=2)
    assert cfg.model.llm.padded_vocab_size == 1024
    unpadded = load_config("tiny", [*ODD, "parallel.tensor_model_parallel_size=2",
                                    "model.llm.make_vocab_size_divisible_by=1"])
    with pytest.raises(ConfigError, match=r"model\.llm\.vocab_size=1023 padded to a multiple of "
                       r"model\.llm\.make_vocab_size_divisible_by=1 is 1023, which "
                       r"parallel\.tensor_model_parallel_size=2 does not divide"):
        validate(unpadded, world_size=2)
    with pytest.raises(ConfigError, match=r"model\.llm\.make_vocab_size_divisible_by must be >= 1"):
        validate(load_config("tiny", ["model.llm.make_vocab_size_divisible_by=0"]))


def build(cfg):
    from megatron.core import tensor_parallel

    from megatron_mm1.models.mm1 import MM1Model

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return MM1Model(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_a_padded_model_computes_as_an_unpadded_one(single_process_runtime, tied):
    """The same weights with and without the padding row: equal losses, z-losses and gradients;
    no gradient on the padding; its logit -inf, so that even a padding row that would win every
    softmax is never generated."""
    from megatron_mm1.generate import next_token
    from megatron_mm1.synthetic import synthetic_microbatch

    overrides = [*ODD, f"model.llm.tie_embeddings={str(tied).lower()}", "model.logits_z_loss_coeff=0.01"]
    padded_cfg = load_config("tiny", overrides)
    plain = build(load_config("tiny", [*overrides, "model.llm.make_vocab_size_divisible_by=1"]))
    padded = build(padded_cfg)
    batch = synthetic_microbatch(padded_cfg, seed=3, images_per_row=[1, 0])
    args = (batch["tokens"], batch["segment_ids"])
    with torch.no_grad():
        logits = plain(*args, images=batch["images"])
    favourite = logits[0, -1].argmax()
    assert logits[0, -1, favourite] > 0  # so 10x its output row wins the softmax unmasked
    plain_params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, p in padded.named_parameters():
            q = plain_params[name]
            if p.shape != q.shape:  # the vocabulary's rows: the padding row is 10x the favourite's
                assert p.shape[0] == q.shape[0] + 1 and name.endswith(("word_embeddings.weight", "output_layer.weight"))
                p.copy_(torch.cat([q, 10 * q[favourite : favourite + 1]]))
            else:
                p.copy_(q)

    outputs = {}
    for key, model in (("plain", plain), ("padded", padded)):
        out = model(*args, images=batch["images"], labels=batch["labels"])
        ((out.lm_loss + out.z_loss) * batch["loss_mask"]).sum().backward()
        outputs[key] = out
    torch.testing.assert_close(outputs["padded"].lm_loss, outputs["plain"].lm_loss)
    torch.testing.assert_close(outputs["padded"].z_loss, outputs["plain"].z_loss)
    for name, p in padded.named_parameters():
        q = plain_params[name]
        torch.testing.assert_close(p.grad[: q.shape[0]], q.grad, msg=name)
        assert not p.grad[q.shape[0]:].any(), name  # no gradient on the padding

    with torch.no_grad():
        padded_logits = padded(*args, images=batch["images"])
    assert padded_logits.shape[-1] == 1024 and (padded_logits[..., VOCAB] == float("-inf")).all()
    torch.testing.assert_close(padded_logits[..., :VOCAB], logits)
    last = padded_logits[0, -1]
    assert next_token(last, 0.0, 1.0, torch.Generator()) == int(favourite)
    gen = torch.Generator().manual_seed(0)
    assert all(next_token(last, 2.0, 1.0, gen) < VOCAB for _ in range(200))


def test_odd_vocabulary_at_tp2_equals_one_process(tmp_path):
    """vocab_size=1023 at TP2 (SP, z-loss): the padding on the second rank's shard; loss and every
    gradient equal one process's (tests/parallel_check.py)."""
    script = "tests/parallel_check.py"
    sets = ["--set", *ODD, "model.logits_z_loss_coeff=0.001"]
    tp2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    run([sys.executable, script, "reference", "--config", "tiny", "--out", str(tmp_path), *sets])
    torchrun(2, script, "run", "--config", "tiny", "--out", str(tmp_path), "--tag", "tp2", *sets, *tp2)
    proc = run([sys.executable, script, "compare", "--config", "tiny", "--out", str(tmp_path), "--tag", "tp2", *sets])
    report = json.loads([l for l in proc.stdout.splitlines() if l.startswith("REPORT ")][-1][len("REPORT "):])["tp2"]
    assert report["loss_rel_err"] < 1e-5 and report["grad_rel_err"] < 1e-5, report
    assert report["loss"] > 1.0, report


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def odd_llama(request, tmp_path_factory):
    """transformers' LlamaForCausalLM with a 1023-id vocabulary, random weights, saved."""
    from test_hf_families import SHAPE, randomize
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPE, "vocab_size": VOCAB}, tie_word_embeddings=request.param)
    model = LlamaForCausalLM(config).eval()
    randomize(model, seed=5)
    folder = tmp_path_factory.mktemp("odd_llama")
    model.save_pretrained(folder)
    yield model, folder
    from megatron_mm1.runtime import shutdown

    shutdown()


def safetensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_hugging_face_import_and_export_without_the_padding(odd_llama, tmp_path):
    """Imported with a zero padding row, logits equal to the original's on every id; exported
    (text-only and MM1) as the original tensors bit for bit, vocab_size 1023."""
    from test_hf_families import assert_same_logits, import_llm, megatron_logits, stored_tensors

    from megatron_mm1.checkpoint import load_checkpoint_config
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.verify import verify

    model, src = odd_llama
    ckpt = import_llm(src, tmp_path / "ckpt")
    llm = load_checkpoint_config(ckpt).model.llm
    assert (llm.vocab_size, llm.padded_vocab_size, llm.tie_embeddings) == (VOCAB, 1024, model.config.tie_word_embeddings)
    stored = stored_tensors(ckpt)
    rows = {"llm.embedding.word_embeddings.weight": model.model.embed_tokens.weight}
    if not llm.tie_embeddings:
        rows["llm.output_layer.weight"] = model.lm_head.weight
    assert {n for n, t in stored.items() if t.shape[0] == 1024} == set(rows)
    for name, original in rows.items():
        assert torch.equal(stored[name][:VOCAB], original) and not stored[name][VOCAB:].any(), name
    gen = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.randint(5, VOCAB, (1, 63), generator=gen), torch.tensor([[VOCAB - 1]])], dim=1)
    with torch.no_grad():
        assert_same_logits(model(input_ids=tokens).logits, megatron_logits(ckpt, tokens), "import")

    exported = to_hf(ckpt, tmp_path / "llm", text_only=True, progress=False)
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == VOCAB
    original, back = safetensors(src), safetensors(exported)
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    mm1 = to_hf(ckpt, tmp_path / "mm1", progress=False)
    assert json.loads((mm1 / "config.json").read_text())["text_config"]["vocab_size"] == VOCAB
    metrics = verify(ckpt, mm1)  # logits with images
    assert metrics["max_abs_diff"] < 1e-4 and metrics["top1_agreement"] == 1.0, metrics


def test_train_at_tp2_from_the_import_then_export(odd_llama, tmp_path):
    """Two `mm1 train` steps at TP2 from the padded import: the padding rows are still exactly
    zero (no gradient, no update), and the TP2 checkpoint exports with logits equal to megatron's."""
    from test_hf_families import import_llm, stored_tensors

    from megatron_mm1.checkpoint import latest_checkpoint
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.verify import verify

    model, src = odd_llama
    ckpt = import_llm(src, tmp_path / "ckpt")
    data = tmp_path / "demo"
    run([sys.executable, "-m", "megatron_mm1.cli", "data", "demo", "--out", str(data)])
    cmd = [sys.executable, "-m", "megatron_mm1.cli", "train", "--config", str(ckpt / "config.yaml"),
           "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2", "--nproc", "2"]
    for item in ["parallel.tensor_model_parallel_size=2", f"checkpoint.finetune_from={ckpt}",
                 "training.warmup_steps=1"]:
        cmd += ["--set", item]
    run(cmd)
    trained = latest_checkpoint(tmp_path / "run" / "checkpoints")
    before, after = stored_tensors(ckpt), stored_tensors(trained)
    for name in ("llm.embedding.word_embeddings.weight", "llm.output_layer.weight"):
        if name in after:
            assert not after[name][VOCAB:].any(), name
            assert not torch.equal(after[name][:VOCAB], before[name][:VOCAB]), name  # trained
    exported = to_hf(trained, tmp_path / "llm", text_only=True, progress=False)
    metrics = verify(trained, exported, text_only=True)
    assert metrics["max_abs_diff"] < 1e-4 and metrics["top1_agreement"] == 1.0, metrics
