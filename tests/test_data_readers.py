"""`mm1 data prepare --format webdataset | llava | parquet-caption | parquet-interleaved`: each
format's good records arrive intact (kinds, texts, image bytes), each bad one is counted exactly."""

import argparse
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_mm1.data import cli, readers
from megatron_mm1.data.formats import DataError, ShardedDataset, load_manifest, read_member
from megatron_mm1.data.prepare import prepare


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mm1")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def image(seed: int, fmt: str = "PNG", size: int = 8) -> bytes:
    """A small real image, different for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def contents(out, kind: str) -> list[list]:
    """The prepared samples of one kind, in order: each a list of texts and image bytes."""
    dataset = ShardedDataset(out, kind)
    return [[read_member(*s["image"]) if "image" in s else s["text"] for s in dataset[i]["segments"]]
            for i in range(len(dataset))]


# ----------------------------------------------------------------------------- webdataset


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cut_inside(path, member: str) -> None:
    """Truncate a tar shard halfway through one member's data."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


def cut_after(path, member: str) -> None:
    """Truncate a tar shard right after one member (on a block boundary: tarfile sees no error)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + -(-info.size // 512) * 512])


WEBDATASET_SKIPS = {"missing_image": 1, "empty_text": 2, "corrupt_image": 1, "invalid_record": 1,
                    "truncated_shard": 2, "unreadable_file": 1}


@pytest.fixture
def shards(tmp_path):
    """img2dataset-style shards: 6 good samples and the bad ones of WEBDATASET_SKIPS."""
    folder = tmp_path / "wds"
    folder.mkdir()
    meta = json.dumps({"url": "http://example.com/x.jpg", "width": 8}).encode()
    write_tar(folder / "00000.tar", [
        ("000.jpg", image(0, "JPEG")), ("000.txt", b"a jpeg"), ("000.json", meta),
        ("001.png", image(1)), ("001.txt", "a png, caf\u00e9".encode()), ("001.json", meta),
        ("002.txt", b"no image"), ("002.json", meta),  # missing_image
        ("003.jpg", image(3, "JPEG")), ("003.txt", b"  \n"),  # empty_text
        ("004.jpg", image(4, "JPEG")), ("004.json", meta),  # no caption: empty_text
        ("005.jpg", b"not an image"), ("005.txt", b"garbage bytes"),  # corrupt_image
        ("006.jpg", image(6, "JPEG")), ("006.txt", b"\xff\xfe"),  # not UTF-8: invalid_record
        ("007.webp", image(7, "WEBP")), ("007.txt", b"a webp"),
    ])
    big = image(12, size=64)  # large enough to be cut in the middle
    write_tar(folder / "00001.tar", [
        ("010.jpg", image(10, "JPEG")), ("010.txt", b"before the cut"),
        ("011.jpg", image(11, "JPEG")), ("011.txt", b"just before the cut"),
        ("012.png", big), ("012.txt", b"lost"),
    ])
    cut_inside(folder / "00001.tar", "012.png")  # truncated_shard; 010 and 011 kept
    (folder / "00002.tar").write_bytes(b"this is not a tar file" * 40)  # unreadable_file
    write_tar(folder / "00003.tar", [
        ("020.jpg", image(20, "JPEG")), ("020.txt", b"kept"),
        ("021.jpg", image(21, "JPEG")), ("021.txt", b"lost at the boundary"),
        ("022.jpg", image(22, "JPEG")), ("022.txt", b"never there"),
    ])
    cut_after(folder / "00003.tar", "021.jpg")  # truncated_shard, silently for tarfile; 020 kept
    (folder / "notes.txt").write_text("not a shard: only *.tar is read from a folder")
    return folder


def test_webdataset_shards_become_captions(shards, tmp_path):
    result = prepare(shards, None, tmp_path / "out", input_format="webdataset", progress=False)
    assert dict(result.skipped_by_reason) == WEBDATASET_SKIPS
    assert result.written == 6

    manifest = load_manifest(tmp_path / "out")
    assert set(manifest["kinds"]) == {"caption"}
    assert manifest["source"]["format"] == "webdataset" and manifest["source"]["inputs"] == [str(shards)]
    assert contents(tmp_path / "out", "caption") == [
        [image(0, "JPEG"), "a jpeg"], [image(1), "a png, caf\u00e9"], [image(7, "WEBP"), "a webp"],
        [image(10, "JPEG"), "before the cut"], [image(11, "JPEG"), "just before the cut"],
        [image(20, "JPEG"), "kept"]]
    assert any(e.startswith("00000.tar key 002: missing_image") for e in result.examples)
    assert "00001.tar: truncated_shard: cut inside sample 012" in "\n".join(result.examples)

    # A key is the file's number and the sample's position in it, rejected ones included: the same
    # input, the same keys. Each input file is a unit, with shards of its own.
    keys = []
    for shard in manifest["kinds"]["caption"]["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            keys += [m.name[:-5] for m in tar.getmembers() if m.name.endswith(".json")]
    assert keys == ["000000000000000", "000000000000001", "000000000000007",  # 00000.tar
                    "000001000000000", "000001000000001", "000003000000000"]  # 00001.tar, 00003.tar
    assert [s["name"] for s in manifest["kinds"]["caption"]["shards"]] == [
        "caption-u000000-0000.tar", "caption-u000001-0000.tar", "caption-u000003-0000.tar"]


def test_webdataset_keys_choose_the_members(shards, tmp_path):
    result = prepare(shards / "00000.tar", None, tmp_path / "out", input_format="webdataset",
                     image_key="PNG", text_key="json", progress=False)
    assert result.written == 1  # only 001 has a .png; its caption is now the metadata JSON
    assert contents(tmp_path / "out", "caption") == [[image(1), json.dumps({"url": "http://example.com/x.jpg",
                                                                            "width": 8})]]


# ----------------------------------------------------------------------------- llava


LLAVA_SKIPS = {"image_marker_mismatch": 3, "missing_image": 1, "corrupt_image": 1, "empty_text": 1,
               "invalid_record": 3}


@pytest.fixture
def llava(tmp_path):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    (images / "coco" / "a.png").write_bytes(image(0))
    (images / "b.jpg").write_bytes(image(1, "JPEG"))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 not really")

    def turns(*pairs):
        return [{"from": speaker, "value": value} for speaker, value in pairs]

    records = [
        {"id": "instruct", "image": "coco/a.png",
         "conversations": turns(("human", "<image>\nWhat colour is it?"), ("gpt", "Noisy."),
                                ("human", "Sure?"), ("gpt", "Yes."))},
        {"id": "pretrain", "image": "b.jpg",
         "conversations": turns(("human", "Render a clear and concise summary of the photo.\n<image>"),
                                ("gpt", "random pixels"))},
        {"id": "no-marker", "image": "b.jpg",
         "conversations": turns(("system", "Be brief."), ("human", "Describe."), ("gpt", "Pixels."))},
        {"id": "text-only", "conversations": turns(("human", "Hello"), ("gpt", "Hi!"))},
        {"id": "two-markers", "image": "b.jpg",
         "conversations": turns(("human", "<image> and <image>"), ("gpt", "x"))},  # image_marker_mismatch
        {"id": "marker-no-image", "conversations": turns(("human", "<image>\nWhat?"), ("gpt", "x"))},  # mismatch
        {"id": "marker-in-answer", "image": "b.jpg",
         "conversations": turns(("human", "Draw it"), ("gpt", "<image>"))},  # image_marker_mismatch
        {"id": "absent", "image": "nowhere.png",
         "conversations": turns(("human", "<image>"), ("gpt", "x"))},  # missing_image
        {"id": "corrupt", "image": "corrupt.jpg",
         "conversations": turns(("human", "<image>"), ("gpt", "x"))},  # corrupt_image
        {"id": "unanswered", "image": "b.jpg", "conversations": turns(("human", "<image>\nWhat?"))},  # empty_text
        {"id": "bad-role", "conversations": turns(("bot", "hi"), ("gpt", "x"))},  # invalid_record
        {"id": "no-list", "conversations": "human: hi"},  # invalid_record
        {"id": "two-images", "image": ["b.jpg", "coco/a.png"],
         "conversations": turns(("human", "<image>"), ("gpt", "x"))},  # invalid_record
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records, indent=1))
    return tmp_path


def test_llava_conversations_become_chats(llava):
    result = prepare(llava / "llava.json", llava / "images", llava / "out", input_format="llava", progress=False)
    assert dict(result.skipped_by_reason) == LLAVA_SKIPS
    assert result.written == 4
    assert "record 5 (id two-markers): image_marker_mismatch" in "\n".join(result.examples)

    a, b = image(0), image(1, "JPEG")
    assert contents(llava / "out", "chat") == [
        ["User: ", a, "What colour is it?", "\nAssistant: ", "Noisy.", "\nUser: ", "Sure?", "\nAssistant: ", "Yes."],
        ["User: ", "Render a clear and concise summary of the photo.", b, "\nAssistant: ", "random pixels"],
        ["System: ", "Be brief.", "\nUser: ", b, "Describe.", "\nAssistant: ", "Pixels."],  # image first
        ["User: ", "Hello", "\nAssistant: ", "Hi!"],
    ]
    # The loss is on the answers only (LLaVA-Pretrain too: its caption is the gpt turn).
    pretrain = ShardedDataset(llava / "out", "chat")[1]["segments"]
    assert [s["text"] for s in pretrain if s.get("loss")] == ["random pixels"]


def test_llava_jsonl_and_conversations_key(llava, capsys):
    lines = [json.dumps({"image": "coco/a.png", "messages": [{"from": "human", "value": "<image>"},
                                                               {"from": "gpt", "value": "noise"}]}),
             "", "{not json", json.dumps({"conversations": []})]
    (llava / "llava.jsonl").write_text("\n".join(lines) + "\n")
    assert run_cli(["data", "prepare", "--format", "llava", "--input", str(llava / "llava.jsonl"),
                    "--images", str(llava / "images"), "--conversations-key", "messages,conversations",
                    "--out", str(llava / "out"), "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1]) == {
        "written": 1, "skipped": 2, "skipped_by_reason": {"malformed_json": 1, "invalid_record": 1}}
    assert "skipped line 3: malformed_json" in out.err
    assert contents(llava / "out", "chat") == [["User: ", image(0), "\nAssistant: ", "noise"]]


# ----------------------------------------------------------------------------- parquet


def image_struct(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CAPTION_SKIPS = {"missing_image": 2, "empty_text": 2, "corrupt_image": 1, "unreadable_file": 2}


def damage_row_group(path, row_group: int) -> None:
    """Overwrite the first page header of one row group's first column."""
    offset = pq.ParquetFile(path).metadata.row_group(row_group).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset + 20: offset + 60] = bytes(40)
    path.write_bytes(bytes(data))


@pytest.fixture
def caption_parquet(tmp_path):
    """Hugging Face layout (image struct, 'caption') in one file, plain bytes and 'text' in the
    next, 70 rows so that reading crosses record batches; a file damaged after its first 64 rows,
    and a truncated one."""
    folder = tmp_path / "hf"
    folder.mkdir()
    rows = [
        (image_struct(image(0)), "first"),
        (None, "no image"),  # missing_image
        (image_struct(None, "elsewhere/0001.jpg"), "only a path"),  # missing_image
        (image_struct(image(3)), None),  # empty_text
        (image_struct(image(4)), " "),  # empty_text
        (image_struct(b"\x89PNG garbage"), "corrupt"),  # corrupt_image
        (image_struct(image(6, "JPEG")), "last of file 0"),
    ]
    table = pa.table({"image": pa.array([r[0] for r in rows], IMAGE_STRUCT),
                      "caption": pa.array([r[1] for r in rows], pa.string()),
                      "width": pa.array([8] * len(rows), pa.int32())})
    pq.write_table(table, folder / "train-00000-of-00003.parquet")
    pq.write_table(pa.table({"image": pa.array([image(100 + i) for i in range(70)], pa.binary()),
                             "text": [f"row {i}" for i in range(70)]}),
                   folder / "train-00001-of-00003.parquet", row_group_size=30)
    damaged = folder / "train-00002-of-00003.parquet"
    pq.write_table(pa.table({"image": pa.array([image(200 + i) for i in range(128)], pa.binary()),
                             "caption": [f"damaged file row {i}" for i in range(128)]}), damaged, row_group_size=64)
    damage_row_group(damaged, 1)  # unreadable_file from row 64 on; rows 0-63 kept
    whole = (folder / "train-00001-of-00003.parquet").read_bytes()
    (folder / "train-00003-of-00003.parquet").write_bytes(whole[: len(whole) // 2])  # unreadable_file: no footer
    return folder


def test_parquet_captions(caption_parquet, tmp_path):
    result = prepare(caption_parquet, None, tmp_path / "out", input_format="parquet-caption", progress=False)
    assert dict(result.skipped_by_reason) == CAPTION_SKIPS
    assert result.written == 136
    expected = [[image(0), "first"], [image(6, "JPEG"), "last of file 0"]]
    expected += [[image(100 + i), f"row {i}"] for i in range(70)]
    expected += [[image(200 + i), f"damaged file row {i}"] for i in range(64)]
    assert contents(tmp_path / "out", "caption") == expected
    examples = "\n".join(result.examples)
    assert "train-00000-of-00003.parquet row 2: missing_image: no image bytes (path 'elsewhere/0001.jpg')" in examples
    assert "train-00002-of-00003.parquet row 64: unreadable_file" in examples
    assert "train-00003-of-00003.parquet row 0: unreadable_file" in examples


def test_parquet_columns_are_checked_before_any_work(caption_parquet, tmp_path):
    file = caption_parquet / "train-00000-of-00003.parquet"
    with pytest.raises(DataError, match="has no column picture .*its columns: image, caption, width.*--image-key"):
        prepare(file, None, tmp_path / "a", input_format="parquet-caption", image_key="picture", progress=False)
    with pytest.raises(DataError, match="column width is int32, not string; name the right one with --text-key"):
        prepare(file, None, tmp_path / "b", input_format="parquet-caption", text_key="width", progress=False)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://example.com/1.jpg"], "caption": ["x"]}), urls)
    with pytest.raises(DataError, match="URLs"):
        prepare(urls, None, tmp_path / "c", input_format="parquet-caption", image_key="url", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


INTERLEAVED_SKIPS = {"invalid_record": 4, "missing_image": 1, "empty_text": 1, "corrupt_image": 1}


def test_obelics_documents_become_interleaved(tmp_path):
    docs = [  # (texts, images)
        (["Intro", None, "Outro"], [None, image_struct(image(0)), None]),
        ([None, "Between", None, ""], [image_struct(image(1)), None, image_struct(image(2)), None]),
        (["Only text"], [None]),
        (["Both", None], [image_struct(image(3)), None]),  # invalid_record: position 0 holds both
        (["Text", None], [None, None]),  # invalid_record: position 1 holds neither
        (["Text", None], [None]),  # invalid_record: lists of different lengths
        (None, [image_struct(image(4))]),  # invalid_record: no texts
        (["Text", None], [None, image_struct(None, "x.jpg")]),  # missing_image
        (["  ", None], [None, image_struct(image(5))]),  # empty_text
        (["Text", None], [None, image_struct(b"garbage")]),  # corrupt_image
    ]
    pq.write_table(pa.table({"texts": pa.array([d[0] for d in docs], pa.list_(pa.string())),
                             "images": pa.array([d[1] for d in docs], pa.list_(IMAGE_STRUCT))}),
                   tmp_path / "obelics.parquet")
    result = prepare(tmp_path / "obelics.parquet", None, tmp_path / "out", input_format="parquet-interleaved",
                     progress=False)
    assert dict(result.skipped_by_reason) == INTERLEAVED_SKIPS
    assert result.written == 3
    assert contents(tmp_path / "out", "interleaved") == [
        ["Intro", image(0), "Outro"], [image(1), "Between", image(2)], ["Only text"]]
    assert "obelics.parquet row 3: invalid_record: position 0 holds both a text and an image" in result.examples


# ----------------------------------------------------------------------------- the command line


def test_cli_webdataset_summary(shards, tmp_path, capsys):
    assert run_cli(["data", "prepare", "--format", "webdataset", "--input", str(shards / "00000.tar"),
                    str(shards / "00001.tar"), "--out", str(tmp_path / "out"), "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1]) == {
        "written": 5, "skipped": 6, "skipped_by_reason": {"missing_image": 1, "empty_text": 2, "corrupt_image": 1,
                                                          "invalid_record": 1, "truncated_shard": 1}}
    assert "skipped 00000.tar key 005: corrupt_image" in out.err


def test_cli_refuses_a_missing_or_misplaced_images_folder(llava, shards, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--quiet"]
    llava_input = ["--format", "llava", "--input", str(llava / "llava.json")]
    assert run_cli(["data", "prepare", *llava_input, *out]) == 1
    assert "--format llava needs --images" in capsys.readouterr().err
    assert run_cli(["data", "prepare", "--input", str(llava / "llava.json"), *out]) == 1  # jsonl, the default
    assert "--format jsonl needs --images" in capsys.readouterr().err
    assert run_cli(["data", "prepare", *llava_input, "--images", str(tmp_path / "absent"), *out]) == 1
    assert "images folder" in capsys.readouterr().err
    assert run_cli(["data", "prepare", "--format", "webdataset", "--input", str(shards),
                    "--images", str(llava / "images"), *out]) == 1
    assert "--images does not apply to --format webdataset" in capsys.readouterr().err
    assert run_cli(["data", "prepare", *llava_input, "--images", str(llava / "images"), "--text-key", "t", *out]) == 1
    err = capsys.readouterr().err
    assert "--text-key does not apply to --format llava" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_help_lists_the_formats(capsys):
    assert cli.FORMATS == readers.FORMATS  # cli.py keeps its own copy to stay light to import
    with pytest.raises(SystemExit):
        run_cli(["data", "prepare", "--help"])
    help_text = capsys.readouterr().out
    for fmt in readers.FORMATS:
        assert fmt in help_text
    assert "--text-key caption,text" in help_text
