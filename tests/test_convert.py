"""Hugging Face conversion: checkpoints saved at TP2xPP2 (dense) and TP2xPP2xEP2 (MoE) by real
gloo processes, converted in this process, compared with transformers.

This file is also the torchrun worker that saves those checkpoints (`save` mode, at the end).
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, colour_tasks, run, torchrun

from megatron_mm1.models import te_spec

# Saved by 4 gloo processes at these layouts (the MoE presets' path: Llama and Qwen2-MoE).
LAYOUTS = {
    "dense": ("tiny", ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]),
    "moe": ("tiny-moe", [
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
        "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1",
        "parallel.sequence_parallel=true",
    ]),
}
# Saved in this process: QK-norm (Qwen3, Qwen3-MoE) and a ViT feature layer before the last;
# the `fast` spec's grouped-GEMM experts (stacked weights, SequentialMLP's checkpoint keys).
VARIANTS = {
    "dense-qk": ("tiny", ["model.llm.qk_layernorm=true", "model.vision.feature_layer=-2"]),
    "moe-qk": ("tiny-moe", ["model.llm.qk_layernorm=true", "model.vision.feature_layer=-2"]),
    "moe-fast": ("tiny-moe", ["model.layer_spec=fast"]),
}
KINDS = [*LAYOUTS, *VARIANTS]
MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from megatron_mm1.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("convert")
    words = ["red", "circle", "blue", "square", "a", "the", "on", "under", "green", "photo", "of"]
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)))
    tokenizer = train_tokenizer([text], root / "sp", vocab_size=300)
    for kind, (config, overrides) in LAYOUTS.items():
        torchrun(4, str(Path(__file__)), "save", config, str(root / kind), *overrides)
    for kind, (config, overrides) in VARIANTS.items():
        save_in_this_process(config, root / kind, overrides)
    yield {"root": root, "tokenizer": tokenizer}
    # Conversions start megatron-core in this process; later test modules start their own.
    from megatron_mm1.runtime import shutdown

    shutdown()


def test_repeated_starts_leave_no_process_groups_behind():
    """Each conversion restarts the one-process runtime; gloo groups left alive keep threads
    of their own (a few dozen per start), which slowed long-lived processes to a crawl."""
    from megatron_mm1.config import load_config
    from megatron_mm1.runtime import single_process

    single_process(load_config("tiny"))
    threads = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        single_process(load_config("tiny"))
    assert len(os.listdir("/proc/self/task")) <= threads


def export(work, kind: str, **kwargs) -> Path:
    """to-hf once per (kind, options) for the module."""
    from megatron_mm1.hf.export import to_hf

    out = work["root"] / f"hf_{kind}_{'_'.join(f'{k}{v}' for k, v in sorted(kwargs.items()))}"
    if not out.exists():
        to_hf(work["root"] / kind, out, tokenizer=work["tokenizer"], progress=False, **kwargs)
    return out


def reference_model(ckpt: Path):
    """The checkpoint through megatron_mm1's own loader (not the converter's reader), fp32."""
    import dataclasses

    from megatron_mm1.checkpoint import load_checkpoint_config, load_model
    from megatron_mm1.models.mm1 import MM1Model
    from megatron_mm1.runtime import single_process

    cfg = load_checkpoint_config(ckpt)
    cfg = single_process(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, bf16=False)))
    model = MM1Model(cfg).eval()
    load_model([model], ckpt / "model")
    return cfg, model


@pytest.mark.parametrize("kind", KINDS)
def test_exported_logits_equal_megatron(work, kind):
    from transformers import AutoModelForImageTextToText

    from megatron_mm1.hf.verify import compare, hf_logits, megatron_logits, prompts

    # A small shard size: several shards and the index must load as one model.
    out = export(work, kind, max_shard_bytes=300_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    cfg, reference = reference_model(work["root"] / kind)
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    # The LLM and the vision tower are transformers' own classes, not remote code.
    expected = {
        "dense": "LlamaForCausalLM", "moe": "Qwen2MoeForCausalLM",
        "dense-qk": "Qwen3ForCausalLM", "moe-qk": "Qwen3MoeForCausalLM", "moe-fast": "Qwen2MoeForCausalLM",
    }[kind]
    assert type(model.language_model).__name__ == expected
    assert type(model.language_model).__module__.startswith("transformers.models.")
    assert type(model.vision_tower).__module__.startswith("transformers.models.clip.")
    # Only the ViT layers up to the feature layer are exported.
    assert model.config.vision_config.num_hidden_layers == cfg.model.vision.num_layers_used
    batch = prompts(cfg, text_only=False, seed=11)
    assert [len(p["images"]) for p in batch] == [0, 1, 3]
    for p in batch:
        metrics = compare(megatron_logits(reference, p["tokens"], p["images"]),
                          hf_logits(model, p["tokens"], p["images"], text_only=False))
        assert metrics["max_abs_diff"] < MAX_ABS_DIFF, metrics
        assert metrics["top1_agreement"] == 1.0, metrics


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_text_only_export_is_native(work, kind):
    import json

    from transformers import AutoModelForCausalLM

    from megatron_mm1.hf.verify import compare, megatron_logits, prompts

    out = export(work, kind, text_only=True)
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg, reference = reference_model(work["root"] / kind)
    (p,) = prompts(cfg, text_only=True, seed=5)
    with torch.no_grad():
        metrics = compare(megatron_logits(reference, p["tokens"], p["images"]), model(input_ids=p["tokens"]).logits)
    assert metrics["max_abs_diff"] < MAX_ABS_DIFF and metrics["top1_agreement"] == 1.0, metrics


def all_tensors(ckpt: Path) -> dict:
    from megatron_mm1.hf.megatron_io import MegatronCheckpoint

    reader = MegatronCheckpoint(ckpt)
    return {n: t for names in reader.groups().values() for n, t in reader.read(names).items()}


def stored_layout(ckpt: Path) -> dict:
    """Every key of a dist checkpoint with its global size, dtype and chunks."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt / "model")).read_metadata()
    return {
        key: (tuple(m.size), m.properties.dtype, sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks))
        if hasattr(m, "chunks") else "bytes"
        for key, m in metadata.state_dict_metadata.items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_identical(work, kind):
    from megatron_mm1.checkpoint import load_checkpoint_config, verify_checkpoint
    from megatron_mm1.hf.importer import from_hf

    back = from_hf(export(work, kind), work["root"] / f"back_{kind}", progress=False)
    assert verify_checkpoint(back) == []  # every file in its manifest, as training records them
    assert load_checkpoint_config(back) == load_checkpoint_config(work["root"] / kind)
    if kind in VARIANTS:  # saved by megatron in one process: from-hf writes the same chunks
        assert stored_layout(back) == stored_layout(work["root"] / kind)
    # Loaded by megatron's own dist_checkpointing, as training loads it.
    original, restored = reference_model(work["root"] / kind)[1].state_dict(), reference_model(back)[1].state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, restored[name]), name


@pytest.mark.parametrize("connector", ["avg-pool", "attn-pool"])
def test_ablation_connectors_in_bf16(work, connector):
    """MM1's two ablation connectors export through the remote modeling file; a bf16
    checkpoint exports as bf16 and comes back bit-identical."""
    import json

    from safetensors import safe_open

    from megatron_mm1.cli import main
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.importer import from_hf

    ckpt = work["root"] / connector
    save_in_this_process("tiny", ckpt, [f"model.connector.type={connector}", "training.bf16=true"])
    out = to_hf(ckpt, work["root"] / f"hf_{connector}", tokenizer=work["tokenizer"], progress=False)
    assert json.loads((out / "config.json").read_text())["connector_type"] == connector
    with safe_open(str(next(out.glob("model-*.safetensors"))), framework="pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    # The CLI's own parity check (both sides in fp32 with the same bf16 weights).
    assert main(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(work["root"] / f"v_{connector}"),
                 "--tokenizer", str(work["tokenizer"]), "--verify", "--quiet"]) == 0
    back = from_hf(out, work["root"] / f"back_{connector}", progress=False)
    original, restored = all_tensors(ckpt), all_tensors(back)
    for name, tensor in original.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, restored[name]), name


def test_native_llm_and_clip_import(work):
    from transformers import AutoModelForImageTextToText

    from megatron_mm1.hf.importer import from_hf

    mm1 = AutoModelForImageTextToText.from_pretrained(export(work, "moe"), trust_remote_code=True)
    clip = work["root"] / "clip"
    mm1.vision_tower.save_pretrained(clip)
    out = from_hf(export(work, "moe", text_only=True), work["root"] / "from_native", vision_dir=clip,
                  config="tiny", progress=False)
    original, imported = all_tensors(work["root"] / "moe"), all_tensors(out)
    for name, tensor in original.items():
        same = torch.equal(tensor, imported[name])
        # The LLM and the encoder come from the folders; the connector is fresh.
        assert same != name.startswith("connector."), name


def test_generate_from_an_image_prompt(work):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from megatron_mm1.hf.verify import megatron_logits

    out = export(work, "dense")
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    n = model.config.num_image_tokens
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    from megatron_mm1.data.tokenizer import Tokenizer

    text = "a photo of the red circle under the blue square"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == Tokenizer(work["tokenizer"]).encode(text)
    ids = tokenizer("<image>" * n + "a photo of", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert int((ids == 4).sum()) == n
    pixels = processor(Image.new("RGB", (80, 60), (200, 30, 30)), return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (56, 56)
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    # Greedy decoding with the KV cache continues as the megatron model does on the full text.
    _, reference = reference_model(work["root"] / "dense")
    logits = megatron_logits(reference, generated[:, :-1], pixels)
    assert torch.equal(logits[0, ids.shape[1] - 1 :].argmax(-1), generated[0, ids.shape[1] :])


def test_a_te_checkpoint_generates_with_the_fast_layers_where_te_cannot_run(work, tmp_path, monkeypatch):
    """Every layer spec saves the same weights (models/te_spec.py), so a checkpoint trained with
    `te` generates where Transformer Engine cannot run (this machine, as the test has it), with
    the `fast` layers, as the same weights do under their own spec."""
    from PIL import Image

    from megatron_mm1.generate import Generator, Sampling

    monkeypatch.setattr(te_spec, "unavailable", lambda: "Transformer Engine is absent (as the test has it)")

    te = tmp_path / "te"
    shutil.copytree(work["root"] / "moe", te)
    config = (te / "config.yaml").read_text()
    assert config.count("layer_spec: local") == 1
    (te / "config.yaml").write_text(config.replace("layer_spec: local", "layer_spec: te"))
    image = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image)
    prompts = [("<image>a photo of", [image]), ("the red circle", [])]
    generator = Generator(str(te), str(work["tokenizer"]))
    assert generator.cfg.model.layer_spec == "fast"
    got = generator.generate(prompts, Sampling(5))
    expected = Generator(str(work["root"] / "moe"), str(work["tokenizer"])).generate(prompts, Sampling(5))
    assert [g["tokens"] for g in got] == [e["tokens"] for e in expected]


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_mm1_generate_equals_hf_generate(work, tmp_path, capsys, with_image):
    """`mm1 generate` on the TP2 x PP2 checkpoint (resharded to one process, no KV cache) makes
    the tokens transformers' generate() makes from the export (KV cache), greedy."""
    import json

    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from megatron_mm1.checkpoint import load_checkpoint_config
    from megatron_mm1.cli import main
    from megatron_mm1.data.tokenizer import Tokenizer
    from megatron_mm1.generate import encode_prompt

    image = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image)
    images = [image] if with_image else []
    prompt = ("<image>" if with_image else "") + "a photo of the red"
    argv = ["generate", "--checkpoint", str(work["root"] / "dense"), "--prompt", prompt, "--max-new-tokens", "6",
            "--tokenizer", str(work["tokenizer"]), "--json", *(a for f in images for a in ("--image", str(f)))]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["tokens"]) == 6 or result["stopped_at_eos"]

    cfg = load_checkpoint_config(work["root"] / "dense")
    tokenizer = Tokenizer(work["tokenizer"], cfg.model.image_token_id)
    tokens, pixels = encode_prompt(prompt, images, cfg, tokenizer)
    assert int((tokens == cfg.model.image_token_id).sum()) == len(images) * cfg.model.connector.num_image_tokens
    model = AutoModelForImageTextToText.from_pretrained(export(work, "dense"), trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    padding = list(range(tokenizer.vocab_size, model.config.text_config.vocab_size))  # never generated
    hf = model.generate(input_ids=tokens, pixel_values=pixels if with_image else None, max_new_tokens=6,
                        do_sample=False, suppress_tokens=padding or None)
    assert hf[0, tokens.shape[1]:].tolist() == result["tokens"]


def test_generate_refuses_bad_prompts(work, tmp_path, capsys):
    from megatron_mm1.cli import main

    base = ["generate", "--checkpoint", str(work["root"] / "dense"), "--tokenizer", str(work["tokenizer"])]
    assert main([*base, "--prompt", "<image> a photo"]) == 2
    assert "1 <image> marker(s) but 0 --image file(s)" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main([*base, "--prompt", "<image>", "--image", str(tmp_path / "broken.png")]) == 2
    assert f"--image {tmp_path / 'broken.png'}: cannot use it" in capsys.readouterr().err
    assert main([*base, "--prompt", "a", "--temperature", "-1"]) == 2
    assert "--temperature -1.0 must be >= 0" in capsys.readouterr().err


def test_mm1_eval_answers_with_the_checkpoint_and_scores_as_given_predictions_are(work, tmp_path, capsys):
    """`mm1 eval --checkpoint` (one-shot): each prediction is `mm1 generate`'s greedy answer to
    the item's few-shot prompt, cut at its line break, and the metrics are those `--score`
    gives for the same predictions."""
    import json

    from megatron_mm1.cli import main
    from megatron_mm1.eval.prompts import prediction, prompt
    from megatron_mm1.eval.tasks import load_task
    from megatron_mm1.generate import Generator, Sampling

    tasks = colour_tasks(tmp_path)
    common = ["--tokenizer", str(work["tokenizer"]), "--json", *(a for kind in tasks for a in ("--task", f"{kind}:{tmp_path / kind}.jsonl"))]
    assert main(["eval", "--checkpoint", str(work["root"] / "dense"), "--shots", "1", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "model"), *common]) == 0
    answered = json.loads((tmp_path / "model" / "metrics.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "model" / "predictions.jsonl").read_text().splitlines()]
    generator = Generator(work["root"] / "dense", str(work["tokenizer"]))
    for kind in tasks:
        records = load_task(kind, tmp_path / f"{kind}.jsonl")
        made = [line["prediction"] for line in lines if line["task"] == kind]
        # one prompt at a time here, where `mm1 eval` batched them
        assert made == [prediction(generator.generate([prompt(kind, records, i, 1, 0, tmp_path)], Sampling(3))[0]["text"])
                        for i in range(len(records))]
        (tmp_path / f"{kind}-pred.jsonl").write_text("".join(
            json.dumps({"id": r.id, "prediction": p}) + "\n" for r, p in zip(records, made)))
        assert answered[kind]["checkpoint"] == str(work["root"] / "dense") and answered[kind]["shots"] == 1
    capsys.readouterr()
    assert main(["eval", "--score", *common, *(a for kind in tasks for a in ("--predictions", str(tmp_path / f"{kind}-pred.jsonl")))]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert {k: v["metrics"] for k, v in scored.items()} == {k: v["metrics"] for k, v in answered.items()}


# 4 processes: PP2 x DP2, and TP2 (sequence parallel) x DP2 with the experts over EP2.
PARALLEL_LAYOUTS = {
    "dense": ["parallel.pipeline_model_parallel_size=2"],
    "moe": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
            "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"],
}


@pytest.mark.parametrize("kind", PARALLEL_LAYOUTS)
def test_generate_and_eval_at_a_parallel_layout_answer_as_one_process_does(work, tmp_path, kind):
    """`mm1 generate --nproc 4` at a parallel layout makes the tokens one process makes.
    `mm1 eval --nproc 4` spreads 3 items over 2 data-parallel replicas in batches of 2 (one
    replica steps along idle at the end, as the experts' all-to-all needs) and gives each item
    the answer one process gives it alone."""
    import json

    from PIL import Image

    from megatron_mm1.eval.prompts import prediction, prompt
    from megatron_mm1.eval.tasks import load_task
    from megatron_mm1.generate import Generator, Sampling

    ckpt, tokenizer = str(work["root"] / kind), str(work["tokenizer"])
    layout = [a for item in PARALLEL_LAYOUTS[kind] for a in ("--set", item)]
    image = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image)
    mm1 = [str(Path(sys.executable).parent / "mm1")]
    out = run([*mm1, "generate", "--checkpoint", ckpt, "--tokenizer", tokenizer, "--prompt", "<image>a photo of",
               "--image", str(image), "--max-new-tokens", "5", "--json", "--nproc", "4", *layout]).stdout
    generated = json.loads(out.strip().splitlines()[-1])
    kinds = colour_tasks(tmp_path)
    run([*mm1, "eval", "--checkpoint", ckpt, "--tokenizer", tokenizer, "--shots", "1", "--max-new-tokens", "3",
         "--batch-size", "2", "--out", str(tmp_path / "eval"), "--nproc", "4", *layout,
         *(a for k in kinds for a in ("--task", f"{k}:{tmp_path / k}.jsonl"))])
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]

    one_process = Generator(ckpt, tokenizer)
    alone = one_process.generate([("<image>a photo of", [image])], Sampling(5))[0]
    assert generated["tokens"] == alone["tokens"] and generated["prompt_tokens"] == alone["prompt_tokens"]
    for k in kinds:
        records = load_task(k, tmp_path / f"{k}.jsonl")
        expected = [prediction(one_process.generate([prompt(k, records, i, 1, 0, tmp_path)], Sampling(3))[0]["text"])
                    for i in range(len(records))]
        assert [line["prediction"] for line in lines if line["task"] == k] == expected


def test_a_bad_image_on_one_replica_stops_every_process(work, tmp_path):
    """`mm1 eval --nproc 2` (DP2): the second item's image, replica 1's, does not decode. Both
    processes stop (replica 0 does not wait for the other in a collective), exit code 2, and the
    message naming the image is printed once."""
    import json

    ckpt, tokenizer = str(work["root"] / "dense"), str(work["tokenizer"])
    colour_tasks(tmp_path)
    (tmp_path / "blue.png").write_bytes(b"not an image")
    proc = run([str(Path(sys.executable).parent / "mm1"), "eval", "--checkpoint", ckpt, "--tokenizer", tokenizer,
                "--task", f"caption:{tmp_path / 'caption.jsonl'}", "--nproc", "2"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count(f"mm1 eval: --image {tmp_path / 'blue.png'}: cannot use it") == 1  # rank 0 says it
    assert json.loads((tmp_path / "caption.jsonl").read_text().splitlines()[1])["image"] == "blue.png"


def test_cli_verify(work, capsys):
    from megatron_mm1.cli import main

    out = work["root"] / "cli_verify"
    assert main(["convert", "to-hf", "--checkpoint", str(work["root"] / "moe"), "--out", str(out),
                 "--verify", "--quiet"]) == 0
    assert '"top1_agreement": 1.0' in capsys.readouterr().out
    # ... and the check sees a wrong export: one attention output projection perturbed.
    from safetensors.torch import load_file, save_file

    from megatron_mm1.hf.verify import verify

    (shard,) = out.glob("model-*.safetensors")
    tensors = load_file(shard)
    tensors["language_model.model.layers.0.self_attn.o_proj.weight"] += 0.05
    save_file(tensors, shard, metadata={"format": "pt"})
    assert verify(work["root"] / "moe", out)["max_abs_diff"] > MAX_ABS_DIFF


def assert_refused(argv, message, out: Path, capsys) -> None:
    from megatron_mm1.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


def test_bad_inputs_are_refused_cleanly(work, capsys):
    from megatron_mm1.checkpoint import write_manifest

    root = work["root"]
    out = root / "refused"
    to_hf = ["convert", "to-hf", "--quiet", "--out", str(out), "--checkpoint"]

    broken = root / "broken"
    shutil.copytree(root / "dense", broken)
    write_manifest(broken)  # as training and from-hf record it
    shard = sorted((broken / "model").glob("*.distcp"))[-1]
    data = shard.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    shard.write_bytes(flipped)
    assert_refused(to_hf + [str(broken)], f"model/{shard.name} differs from what was saved", out, capsys)
    shard.write_bytes(data[: len(data) // 2])
    assert_refused(to_hf + [str(broken)], f"model/{shard.name} has {len(data) // 2} bytes, {len(data)} were saved",
                   out, capsys)
    (broken / "manifest.json").unlink()  # a folder put together by hand: the structural checks
    assert_refused(to_hf + [str(broken)], "is truncated", out, capsys)
    shard.unlink()
    assert_refused(to_hf + [str(broken)], "is missing", out, capsys)

    mixed = root / "mixed"  # the dense model's config with the MoE model's weights
    mixed.mkdir()
    shutil.copy(root / "dense" / "config.yaml", mixed)
    shutil.copytree(root / "moe" / "model", mixed / "model")
    assert_refused(to_hf + [str(mixed)], "belong to different models", out, capsys)

    assert_refused(to_hf + [str(root / "nothing")], "is not an MM1 checkpoint", out, capsys)

    hf = root / "hf_truncated"
    shutil.copytree(export(work, "dense"), hf)
    shard = next(hf.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(["convert", "from-hf", "--quiet", "--hf", str(hf), "--out", str(out)],
                   "is not a complete safetensors file", out, capsys)

    foreign = root / "gpt2"  # a Hugging Face model MM1 cannot represent
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(2, 2)}, foreign / "model.safetensors")
    assert_refused(["convert", "from-hf", "--quiet", "--hf", str(foreign), "--out", str(out)],
                   "unsupported language model type 'gpt2'", out, capsys)

    existing = root / "existing"
    existing.mkdir()
    from megatron_mm1.cli import main

    assert main(to_hf[:-3] + ["--out", str(existing), "--checkpoint", str(root / "dense")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(existing.iterdir())


def perturb_and_save(cfg, model: list, out: Path) -> None:
    """Perturb every weight (so that norms and biases are not their trivial init and any
    mix-up shows), then save the checkpoint (collective)."""
    from megatron_mm1.checkpoint import save_config, save_model

    gen = torch.Generator().manual_seed(1 + torch.distributed.get_rank())
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    save_model(model, out / "model")
    if torch.distributed.get_rank() == 0:
        save_config(cfg, out / "config.yaml")


def save_in_this_process(config: str, out: Path, overrides: list[str]) -> None:
    from megatron_mm1.config import load_config
    from megatron_mm1.models.mm1 import MM1Model
    from megatron_mm1.runtime import single_process

    cfg = load_config(config, overrides)
    perturb_and_save(cfg, [MM1Model(single_process(cfg))], out)


def save_checkpoint(config: str, out: str, overrides: list[str]) -> None:
    """torchrun worker: build the model at the config's layout and save it."""
    from megatron_mm1.config import load_config
    from megatron_mm1.models.mm1 import build_model
    from megatron_mm1.runtime import init_runtime, shutdown

    cfg = load_config(config, overrides)
    init_runtime(cfg)
    perturb_and_save(cfg, build_model(cfg), Path(out))
    shutdown()


if __name__ == "__main__" and sys.argv[1] == "save":
    sys.path.insert(0, str(ROOT))
    save_checkpoint(sys.argv[2], sys.argv[3], sys.argv[4:])
