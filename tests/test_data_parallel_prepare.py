"""`mm1 data prepare --workers N | --num-tasks T --task-index I` and `mm1 data merge`: the prepared
folder is byte-identical whatever N and T are; a killed task resumes without redoing or
duplicating anything; merge refuses missing, unfinished and mismatched parts by name."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatron_mm1.config import load_config
from megatron_mm1.data import cli, readers
from megatron_mm1.data.demo import write_corpus
from megatron_mm1.data.formats import MANIFEST, DataError, ShardedDataset, load_manifest
from megatron_mm1.data.loader import build_loader
from megatron_mm1.data.prepare import KILL_AFTER_UNITS_ENV, merge, prepare
from megatron_mm1.data.tokenizer import train_tokenizer
from test_data_readers import IMAGE_STRUCT, contents, cut_inside, image, image_struct, write_tar

MM1 = str(Path(sys.executable).parent / "mm1")
SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


@pytest.fixture(autouse=True)
def outside_a_slurm_array(monkeypatch):
    """In-process `mm1 data prepare` calls read these; the tests set them where they mean to."""
    for variable in SLURM_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mm1")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path: the prepared dataset, bookkeeping included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sample_keys(folder: Path) -> list[str]:
    keys = []
    for info in load_manifest(folder)["kinds"].values():
        for shard in info["shards"]:
            with tarfile.open(folder / shard["name"]) as tar:
                keys += [m.name[:-5] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


# ----------------------------------------------------------------------------- corpora

JSONL_SKIPS = {"malformed_json": 1, "missing_image": 1, "corrupt_image": 1, "empty_text": 1}


def jsonl_corpus(root: Path) -> dict:
    """The demo's captions, interleaved and text documents and two chats, with bad records spread
    over the units: 45 lines, 6 units of 8."""
    path = write_corpus(root, num_captions=24, num_interleaved=6, num_text=6, seed=1)
    images = path.parent / "images"
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    first = sorted(p.name for p in images.iterdir())[0]
    lines = path.read_text().splitlines()
    chat = {"type": "chat", "messages": [{"role": "user", "content": [{"image": first}, {"text": "what is it?"}]},
                                         {"role": "assistant", "content": "shapes."}]}
    for position, line in [(3, '{"type": "caption", "image":'), (9, ""), (12, json.dumps(chat)),
                           (17, json.dumps({"type": "caption", "image": "nowhere.png", "text": "lost"})),
                           (26, json.dumps({"type": "caption", "image": "corrupt.png", "text": "broken"})),
                           (33, json.dumps({"type": "text", "text": "  "})), (40, json.dumps(chat))]:
        lines.insert(position, line)
    path.write_text("\n".join(lines) + "\n")
    return {"input_path": path, "images_dir": images, "input_format": "jsonl", "unit_samples": 8,
            "samples_per_shard": 3}


def webdataset_corpus(root: Path) -> dict:
    """Four img2dataset shards, one unit each; a corrupt image, a missing caption, a cut shard."""
    root.mkdir()
    write_tar(root / "00000.tar", [("a.jpg", image(0, "JPEG")), ("a.txt", b"zero"), ("b.png", image(1)),
                                   ("b.txt", b"one"), ("c.jpg", b"not an image"), ("c.txt", b"corrupt"),
                                   ("d.png", image(3)), ("d.txt", b"three")])
    write_tar(root / "00001.tar", [("e.png", image(4)), ("e.txt", b"four"), ("f.png", image(5)),
                                   ("g.png", image(6)), ("g.txt", b"six")])
    write_tar(root / "00002.tar", [("h.png", image(7)), ("h.txt", b"seven"), ("i.png", image(8)),
                                   ("i.txt", b"eight"), ("j.png", image(9, size=64)), ("j.txt", b"cut")])
    cut_inside(root / "00002.tar", "j.png")
    write_tar(root / "00003.tar", [("k.png", image(10)), ("k.txt", b"ten"), ("l.png", image(11)),
                                   ("l.txt", b"eleven")])
    return {"input_path": root, "images_dir": None, "input_format": "webdataset", "unit_samples": 8,
            "samples_per_shard": 2}


def parquet_corpus(root: Path) -> dict:
    """Two files of 11 and 7 rows in row groups of 4 and 3: units of 5 rows cross row groups."""
    root.mkdir()
    for number, (rows, group) in enumerate([(11, 4), (7, 3)]):
        images = [image_struct(image(100 * number + i)) for i in range(rows)]
        captions = [f"file {number} row {i}" for i in range(rows)]
        if number == 0:
            images[6], captions[9] = None, " "  # missing_image, empty_text
        pq.write_table(pa.table({"image": pa.array(images, IMAGE_STRUCT), "caption": captions}),
                       root / f"train-{number}.parquet", row_group_size=group)
    return {"input_path": root, "images_dir": None, "input_format": "parquet-caption", "unit_samples": 5,
            "samples_per_shard": 2}


def llava_corpus(root: Path) -> dict:
    """A LLaVA JSON list of 12 conversations: units of 5 records, each carrying its records."""
    (root / "images").mkdir(parents=True)
    for i in range(3):
        (root / "images" / f"{i}.png").write_bytes(image(200 + i))
    records = [{"id": i, "image": f"{i % 3}.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                  {"from": "gpt", "value": f"noise number {i}"}]} for i in range(12)]
    records[4]["conversations"][1]["value"] = "<image>"  # image_marker_mismatch
    records[8]["image"] = "absent.png"  # missing_image
    (root / "llava.json").write_text(json.dumps(records))
    return {"input_path": root / "llava.json", "images_dir": root / "images", "input_format": "llava",
            "unit_samples": 5, "samples_per_shard": 2}


CORPORA = {"jsonl": jsonl_corpus, "webdataset": webdataset_corpus, "parquet-caption": parquet_corpus,
           "llava": llava_corpus}
EXPECTED = {  # (units, written, skipped_by_reason)
    "jsonl": (6, 38, JSONL_SKIPS),
    "webdataset": (4, 9, {"corrupt_image": 1, "empty_text": 1, "truncated_shard": 1}),
    "parquet-caption": (5, 16, {"missing_image": 1, "empty_text": 1}),
    "llava": (3, 10, {"image_marker_mismatch": 1, "missing_image": 1}),
}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {name: make(root / name) for name, make in CORPORA.items()}


@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    """Each corpus prepared by one process: what every other way of preparing it must give."""
    root = tmp_path_factory.mktemp("reference")
    for name, corpus in corpora.items():
        prepare(out_dir=root / name, progress=False, **corpus)
    return root


def cli_args(corpus: dict, out: Path) -> list[str]:
    args = ["data", "prepare", "--format", corpus["input_format"], "--input", str(corpus["input_path"]),
            "--out", str(out), "--unit-samples", str(corpus["unit_samples"]),
            "--samples-per-shard", str(corpus["samples_per_shard"]), "--quiet"]
    return args + (["--images", str(corpus["images_dir"])] if corpus["images_dir"] else [])


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("scan_bytes", [1, 3, 1 << 24])
def test_units_cover_every_line_and_row_once(scan_bytes, corpora, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "LINE_SCAN_BYTES", scan_bytes)  # unit boundaries across scan blocks
    for data in [b"", b"a", b"a\n", b"\n\n\n", b"a\n\nb\nc\nd\ne\nf", b"x\n" * 6]:
        (tmp_path / "in.jsonl").write_bytes(data)
        source = readers.open_source("jsonl", tmp_path / "in.jsonl", tmp_path)
        for unit_samples in (1, 2, 3, 5):
            units = source.plan(unit_samples)
            lines = [line for unit in units for line in readers._unit_lines(source, unit)]
            assert lines == list(enumerate(data.splitlines(keepends=True), start=1))
            assert [len(list(readers._unit_lines(source, u))) for u in units[:-1]] == [unit_samples] * (len(units) - 1)
            assert sum(unit.bytes for unit in units) == len(data)

    # Units of 5 rows over row groups of 4 and 3: every row once, in order (two were rejected).
    rows = [[image(i), f"file 0 row {i}"] for i in range(11) if i not in (6, 9)]
    rows += [[image(100 + i), f"file 1 row {i}"] for i in range(7)]
    assert contents(reference / "parquet-caption", "caption") == rows


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", list(CORPORA))
def test_workers_and_tasks_give_the_same_folder(name, corpora, reference, tmp_path):
    corpus, (units, written, skips) = corpora[name], EXPECTED[name]
    expected = tree(reference / name)
    manifest = load_manifest(reference / name)
    assert (manifest["prepare"]["units"], manifest["written"], manifest["skipped_by_reason"]) == (units, written, skips)
    assert sum(len(k["shards"]) for k in manifest["kinds"].values()) > units  # shards roll over within units

    two_workers = prepare(out_dir=tmp_path / "workers", progress=False, workers=2, **corpus)
    assert tree(tmp_path / "workers") == expected
    assert (two_workers.written, two_workers.skipped_by_reason) == (written, skips)

    for task in range(3):
        part = prepare(out_dir=tmp_path / "tasks", progress=False, num_tasks=3, task_index=task, **corpus)
        assert part.units == len(range(task, units, 3))
        assert not (tmp_path / "tasks" / MANIFEST).exists()  # only merge writes it
    merged = merge(tmp_path / "tasks")
    assert tree(tmp_path / "tasks") == expected
    assert (merged.units, merged.written, merged.skipped_by_reason) == (units, written, skips)


@pytest.fixture(scope="module")
def slurm_tasks(corpora, tmp_path_factory):
    """The jsonl corpus prepared by two concurrent `mm1 data prepare` processes, task 0 told by its
    flags and task 1 by a Slurm array's variables, then merged by `mm1 data merge`."""
    out = tmp_path_factory.mktemp("slurm") / "out"
    args = [MM1, *cli_args(corpora["jsonl"], out)]
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARIABLES}
    tasks = [subprocess.Popen(args + ["--num-tasks", "2", "--task-index", "0"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen(args, env={**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    outputs = [task.communicate(timeout=120) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    parts = sorted(p.name for p in (out / "parts").iterdir())
    return out, outputs, parts, corpora["jsonl"]["input_path"]


def test_slurm_array_tasks_and_merge(slurm_tasks, reference, capsys):
    out, [(out0, err0), (out1, err1)], parts, _ = slurm_tasks
    assert "task 0 of 2 (from --num-tasks, --task-index)" in err0
    assert "task 1 of 2 (from SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_ID)" in err1
    assert "task 0 of 2: 3 units" in out0 and f"mm1 data merge --data {out}" in out0
    assert "skipped line 4: malformed_json" in err0  # line 4 is in unit 0, task 0's
    assert parts == ["part-00000-of-00002.commits.jsonl", "part-00000-of-00002.json",
                     "part-00001-of-00002.commits.jsonl", "part-00001-of-00002.json", "tmp"]

    assert run_cli(["data", "merge", "--data", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "written": 38, "skipped": 4, "skipped_by_reason": JSONL_SKIPS}
    assert tree(out) == tree(reference / "jsonl")
    keys = sample_keys(out)
    assert len(keys) == len(set(keys)) == 38


def test_the_loader_reads_a_merged_folder_in_the_same_order(slurm_tasks, reference, tmp_path):
    out = slurm_tasks[0]
    if not (out / MANIFEST).exists():
        merge(out)
    for kind in ("caption", "interleaved", "text", "chat"):
        assert len(ShardedDataset(out, kind)) > 0
        assert contents(out, kind) == contents(reference / "jsonl", kind)

    tokenizer = train_tokenizer([slurm_tasks[3]], tmp_path / "tok", 64, byte_fallback=False)
    batches = []
    for folder in (out, reference / "jsonl"):
        cfg = load_config("tiny", [f"data.path={folder}", f"data.tokenizer={tokenizer}", "data.seq_length=64"])
        loader = iter(build_loader(cfg, num_workers=0))
        batches.append([next(loader) for _ in range(3)])
    for a, b in zip(*batches):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(int(b["num_images"].sum()) for b in batches[0]) > 0


# ----------------------------------------------------------------------------- resumption


def test_a_killed_task_resumes_without_redoing_or_duplicating(corpora, reference, tmp_path, capsys):
    """SIGKILLed after two committed units (by the test hook, while its other worker is busy):
    the re-run keeps those units' shards untouched, drops what the kill left, and ends with the
    uninterrupted run's folder."""
    out = tmp_path / "out"
    args = cli_args(corpora["jsonl"], out)
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARIABLES}
    killed = subprocess.run([MM1, *args, "--workers", "2"], env={**env, KILL_AFTER_UNITS_ENV: "2"},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    journal = (out / "parts" / "part-00000-of-00001.commits.jsonl").read_text().splitlines()
    committed = [json.loads(line) for line in journal[1:]]
    assert len(committed) == 2 and not (out / MANIFEST).exists()
    with pytest.raises(DataError, match=r"part 0 of 1 is incomplete \(part-00000-of-00001.commits.jsonl: "
                                        r"2 of 6 units committed, no part-00000-of-00001.json\)"):
        merge(out)

    kept = {s["name"]: os.stat(out / s["name"]) for r in committed for shards in r["kinds"].values() for s in shards}
    unfinished = next(u for u in range(6) if u not in {r["unit"] for r in committed})
    (out / f"text-u{unfinished:06d}-0000.tar").write_bytes(b"half a shard")  # left by the kill, uncommitted
    (out / "parts" / "tmp" / f"caption-u{unfinished:06d}-0001.tar.99999").write_bytes(b"being written")
    with open(out / "parts" / "part-00000-of-00001.commits.jsonl", "a") as f:
        f.write('{"unit": 5, "kinds"')  # a commit line the kill cut short: no commit

    assert run_cli(args) == 0
    assert f"prepared {out}: 6 units (2 committed by an earlier run)" in capsys.readouterr().out
    assert tree(out) == tree(reference / "jsonl")
    for name, before in kept.items():
        after = os.stat(out / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name  # not redone
    keys = sample_keys(out)
    assert len(keys) == len(set(keys)) == 38

    assert run_cli(args) == 0  # the same preparation again: nothing to do
    assert "already holds this preparation (6 units), nothing to do" in capsys.readouterr().out
    assert tree(out) == tree(reference / "jsonl")


def test_a_failing_unit_is_named_and_the_others_are_kept(corpora, tmp_path):
    """An image the file system cannot read (EIO) is no bad record: the command fails naming the
    unit; the units committed before stay, and the re-run ends as a run that never failed."""
    images = tmp_path / "images"
    shutil.copytree(corpora["jsonl"]["images_dir"], images)
    names = sorted(p.name for p in images.iterdir() if p.name.endswith(".png"))[:6]
    (images / "eio.png").symlink_to("/proc/self/mem")  # is a file; reading it fails with an I/O error
    lines = [{"type": "caption", "image": name, "text": f"picture {k}"} for k, name in enumerate(names)]
    lines[4]["image"] = "eio.png"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    corpus = {"input_path": tmp_path / "in.jsonl", "images_dir": images, "unit_samples": 2, "progress": False}

    with pytest.raises(DataError, match=r"unit 2 \(in.jsonl lines 5-6\): OSError: \[Errno 5\] .*The units "
                                        r"committed so far are kept: fix the cause and re-run the same command"):
        prepare(out_dir=tmp_path / "out", workers=2, **corpus)
    journal = (tmp_path / "out" / "parts" / "part-00000-of-00001.commits.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["unit"] for line in journal[1:]) == [0, 1]

    (images / "eio.png").unlink()
    shutil.copy(images / names[4], images / "eio.png")
    assert prepare(out_dir=tmp_path / "out", **corpus).resumed == 2
    prepare(out_dir=tmp_path / "fresh", **corpus)
    assert tree(tmp_path / "out") == tree(tmp_path / "fresh")


# ----------------------------------------------------------------------------- refusals


def test_merge_and_prepare_refuse_mismatched_or_missing_parts(corpora, tmp_path, capsys):
    corpus = corpora["jsonl"]
    out, other = tmp_path / "out", tmp_path / "other"
    prepare(out_dir=out, progress=False, num_tasks=2, task_index=0, **corpus)
    with pytest.raises(DataError, match=r"part 1 of 2 is missing \(no part-00001-of-00002.json\)"):
        merge(out)

    # A task with other settings is refused before any work, naming the setting and the part it differs from.
    different = {**corpus, "samples_per_shard": 4}
    with pytest.raises(DataError, match=r"is being prepared with other settings \(parts/part-00000-of-00002.commits"
                                        r".jsonl: samples_per_shard: 3 there, 4 here\)"):
        prepare(out_dir=out, progress=False, num_tasks=2, task_index=1, **different)
    with pytest.raises(DataError, match=r"num_tasks: 2 there, 3 here"):
        prepare(out_dir=out, progress=False, num_tasks=3, task_index=1, **corpus)
    assert not (out / "parts" / "part-00001-of-00002.commits.jsonl").exists()

    # Parts of different settings that met anyway (tasks started at once) are refused by merge.
    prepare(out_dir=other, progress=False, num_tasks=2, task_index=1, **different)
    shutil.copy(other / "parts" / "part-00001-of-00002.json", out / "parts")
    with pytest.raises(DataError, match=r"part-00001-of-00002.json was made with other settings than "
                                        r"part-00000-of-00002.json \(samples_per_shard: 3 there, 4 here\)"):
        merge(out)
    shutil.copy(out / "parts" / "part-00000-of-00002.json", out / "parts" / "part-00000-of-00003.json")
    assert run_cli(["data", "merge", "--data", str(out)]) == 1
    assert "its parts are of different task counts (2, 3)" in capsys.readouterr().err
    assert not (out / MANIFEST).exists()

    with pytest.raises(DataError, match="holds no parts to merge"):
        merge(tmp_path / "nothing")


def test_task_flags_and_variables_are_checked(corpora, tmp_path, monkeypatch, capsys):
    args = cli_args(corpora["jsonl"], tmp_path / "out")
    assert run_cli(args + ["--task-index", "1"]) == 1
    assert "--task-index needs --num-tasks (or SLURM_ARRAY_TASK_COUNT)" in capsys.readouterr().err
    assert run_cli(args + ["--num-tasks", "2", "--task-index", "2"]) == 1
    assert "task index 2 is outside 0..1" in capsys.readouterr().err
    assert run_cli(args + ["--workers", "0"]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert run_cli(args) == 1
    assert "4 tasks (SLURM_ARRAY_TASK_COUNT) need --task-index (or SLURM_ARRAY_TASK_ID)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    # --slurm: its options only with it; the task split and the workers are its to set.
    assert run_cli(args + ["--time", "01:00:00"]) == 1
    assert "--time go with --slurm TASKS" in capsys.readouterr().err
    assert run_cli(args + ["--slurm", "2", "--workers", "4", "--dry-run"]) == 1
    assert "--workers are set by --slurm" in capsys.readouterr().err
    missing = list(args)
    missing[missing.index("--input") + 1] = str(tmp_path / "nowhere.jsonl")
    assert run_cli(missing + ["--slurm", "2", "--dry-run"]) == 1
    assert f"input file {tmp_path / 'nowhere.jsonl'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-logs").exists()
