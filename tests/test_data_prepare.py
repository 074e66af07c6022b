"""`mm1 data prepare`: bad inputs are skipped and counted exactly; shards and manifest are sound."""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from megatron_mm1.data.cli import add_parser
from megatron_mm1.data.formats import DataError, ShardedDataset, load_manifest, read_member, verify_checksums
from megatron_mm1.data.prepare import prepare
from test_data_images import png_header_only


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mm1")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


EXPECTED_SKIPS = {"malformed_json": 2, "invalid_record": 2, "missing_image": 1, "corrupt_image": 2,
                  "unsupported_image_mode": 1, "image_too_large": 1, "empty_text": 3}


@pytest.fixture
def messy(tmp_path):
    """A corpus of 8 good records and one bad record per problem in EXPECTED_SKIPS."""
    images = tmp_path / "images"
    images.mkdir()
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 30), colour).save(images / f"rgb{k}.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(images / "grey16.png")
    Image.new("F", (8, 8)).save(images / "float.tiff")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(noisy, "PNG")
    (images / "truncated.png").write_bytes(noisy.getvalue()[:300])
    (images / "bomb.png").write_bytes(png_header_only(20_000, 20_000))

    def rec(**kw):
        return json.dumps(kw)

    lines = [
        rec(type="caption", image="rgb0.png", text="a red box"),
        rec(type="caption", image="rgb1.png", text="a green box"),
        rec(type="caption", image="rgb2.png", text="a blue box"),
        rec(type="caption", image="cmyk.jpg", text="a cmyk red box"),
        rec(type="caption", image="grey16.png", text="a grey box"),
        rec(type="interleaved", segments=[{"text": "first"}, {"image": "rgb0.png"}, {"text": ""},
                                          {"image": "rgb1.png"}, {"text": "second"}]),
        rec(type="text", text="just some text"),
        rec(type="text", text="more text"),
        "",  # a blank line is not a record
        '{"type": "caption", "image":',  # malformed_json
        "\udcff",  # placeholder for an invalid UTF-8 line, written as bytes below; malformed_json
        rec(type="poem", text="unknown type"),  # invalid_record
        rec(type="interleaved", segments="not a list"),  # invalid_record
        rec(type="caption", image="nowhere.png", text="missing"),  # missing_image
        rec(type="caption", image="corrupt.png", text="corrupt"),  # corrupt_image
        rec(type="caption", image="truncated.png", text="truncated"),  # corrupt_image
        rec(type="caption", image="float.tiff", text="float pixels"),  # unsupported_image_mode
        rec(type="caption", image="bomb.png", text="400 megapixels"),  # image_too_large
        rec(type="caption", image="rgb0.png", text=""),  # empty_text
        rec(type="text", text="   "),  # empty_text
        rec(type="interleaved", segments=[{"image": "rgb0.png"}, {"image": "rgb1.png"}]),  # empty_text
    ]
    data = "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n"
    (tmp_path / "in.jsonl").write_bytes(data)
    return tmp_path


def test_bad_records_are_skipped_and_counted_exactly(messy):
    result = prepare(messy / "in.jsonl", messy / "images", messy / "out", progress=False)
    assert result.written == 8
    assert dict(result.skipped_by_reason) == EXPECTED_SKIPS
    assert result.skipped == sum(EXPECTED_SKIPS.values())

    manifest = load_manifest(messy / "out")
    assert manifest["written"] == 8 and manifest["skipped_by_reason"] == EXPECTED_SKIPS
    kinds = manifest["kinds"]
    assert {k: (v["samples"], v["images"]) for k, v in kinds.items()} == {
        "caption": (5, 5), "interleaved": (1, 2), "text": (2, 0)}
    assert verify_checksums(messy / "out") == []

    # The stored interleaved sample keeps its order, minus the empty text segment.
    sample = ShardedDataset(messy / "out", "interleaved")[0]
    assert [next(iter(s)) for s in sample["segments"]] == ["text", "image", "image", "text"]
    shard, member = sample["segments"][1]["image"]
    assert read_member(shard, member) == (messy / "images" / "rgb0.png").read_bytes()


def test_cli_json_summary_is_the_last_line(messy, capsys):
    assert run_cli(["data", "prepare", "--input", str(messy / "in.jsonl"), "--images", str(messy / "images"),
                    "--out", str(messy / "out"), "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary == {"written": 8, "skipped": 12, "skipped_by_reason": EXPECTED_SKIPS}
    assert "line 10: malformed_json" in out.err  # the report names the offending lines


def test_user_errors_are_messages_not_tracebacks(messy, capsys):
    args = ["data", "prepare", "--images", str(messy / "images"), "--out", str(messy / "out"), "--quiet"]
    assert run_cli(args + ["--input", str(messy / "absent.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run_cli(args + ["--input", str(messy / "in.jsonl")]) == 0
    assert run_cli(args + ["--input", str(messy / "in.jsonl")]) == 0  # the same preparation: nothing to do
    assert "already holds this preparation" in capsys.readouterr().out
    assert run_cli(args + ["--input", str(messy / "in.jsonl"), "--samples-per-shard", "2"]) == 1  # another one
    err = capsys.readouterr().err
    assert "already holds prepared data (samples_per_shard: 10000 there, 2 here)" in err and "Traceback" not in err


def test_shards_roll_over_and_are_reproducible(messy):
    a = prepare(messy / "in.jsonl", messy / "images", messy / "a", samples_per_shard=2, progress=False)
    prepare(messy / "in.jsonl", messy / "images", messy / "b", samples_per_shard=2, progress=False)
    assert a.written == 8
    manifest_a, manifest_b = load_manifest(messy / "a"), load_manifest(messy / "b")
    assert [s["samples"] for s in manifest_a["kinds"]["caption"]["shards"]] == [2, 2, 1]
    shards = lambda m: [(s["name"], s["sha256"]) for k in m["kinds"].values() for s in k["shards"]]  # noqa: E731
    assert shards(manifest_a) == shards(manifest_b)  # byte-identical output
    with tarfile.open(messy / "a" / "caption-u000000-0000.tar") as tar:  # webdataset layout: key.ext
        assert [m.name.split(".", 1)[1] for m in tar.getmembers()] == ["img0.png", "json", "img0.png", "json"]


def test_damaged_shards_are_detected(messy, capsys):
    prepare(messy / "in.jsonl", messy / "images", messy / "out", progress=False)
    shard = messy / "out" / "caption-u000000-0000.tar"
    data = shard.read_bytes()
    assert run_cli(["data", "verify", "--data", str(messy / "out"), "--quiet"]) == 0
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert verify_checksums(messy / "out") == ["caption-u000000-0000.tar"]
    capsys.readouterr()
    assert run_cli(["data", "verify", "--data", str(messy / "out"), "--json", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["damaged"] == ["caption-u000000-0000.tar"]
    assert "caption-u000000-0000.tar" in err and "re-run `mm1 data prepare`" in err
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match="truncated or modified"):
        load_manifest(messy / "out")
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        load_manifest(messy / "out")
    with pytest.raises(DataError, match="not a prepared data folder"):
        load_manifest(messy)


def test_chat_samples_carry_the_loss_on_answers_only(tmp_path):
    """Supervised fine-tuning: a chat's loss mask covers the assistants' answers (and the eos
    after the last one), never the prompts, role markers or images."""
    from megatron_mm1.config import load_config
    from megatron_mm1.data.demo import make_demo
    from megatron_mm1.data.loader import build_loader
    from megatron_mm1.data.prepare import prepare

    demo = tmp_path / "demo"
    make_demo(demo)  # for its tokenizer and an image
    image = sorted((demo / "raw" / "images").iterdir())[0].name
    chats = [
        {"type": "chat", "messages": [
            {"role": "user", "content": [{"image": image}, {"text": "what shape is this"}]},
            {"role": "assistant", "content": "a red circle"},
            {"role": "user", "content": "how many"},
            {"role": "assistant", "content": "one"}]},
        {"type": "chat", "messages": [{"role": "user", "content": "hello"}]},  # nothing to learn
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    result = prepare(src, demo / "raw" / "images", tmp_path / "sft", progress=False)
    assert (result.written, result.skipped, result.skipped_by_reason) == (1, 1, {"empty_text": 1})

    cfg = load_config("tiny", [f"data.path={tmp_path / 'sft'}", f"data.tokenizer={demo / 'tokenizer.model'}"])
    batch = next(iter(build_loader(cfg, num_workers=0)))
    from megatron_mm1.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg)
    row, mask, labels = batch["tokens"][0], batch["loss_mask"][0].bool(), batch["labels"][0]
    first = batch["segment_ids"][0] == 1
    learned = tok.decode(labels[mask & first].tolist())
    assert learned.replace(" ", "") == "aredcircleone"  # answers only (plus the eos)
    assert int(labels[mask & first][-1]) == 2  # eos after the final answer
    assert int(batch["num_images"][0]) >= 1 and not mask[row == cfg.model.image_token_id].any()
