"""The loader: exact resumption, data-parallel shares, determinism, the mixture and the validation data."""

import itertools
import json
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from conftest import ROOT

from megatron_mm1.config import ConfigError, load_config, validate
from megatron_mm1.data import formats
from megatron_mm1.data.demo import make_demo
from megatron_mm1.data.formats import DataError, ShardedDataset, load_manifest, read_member
from megatron_mm1.data.loader import ValidationData, build_loader
from megatron_mm1.data.mixture import MixtureSampler, datasets_from_config, hold_out
from megatron_mm1.data.prepare import prepare


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo(root)
    return root


def config(demo, *overrides):
    # A short sequence and few images per row, so documents get split across rows and rows fill up
    # on the image cap: both leave a partly placed sample in the state.
    return load_config("tiny", [f"data.path={demo}", f"data.tokenizer={demo / 'tokenizer.model'}",
                                "data.seq_length=48", "model.max_images_per_sequence=3", *overrides])


def take(loader, k: int) -> list[dict]:
    return list(itertools.islice(iter(loader), k))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("dp_size, workers", [(1, 0), (2, 0), (2, 2)])
def test_resume_gives_the_uninterrupted_batches(demo, dp_size, workers):
    cfg = config(demo)
    split_seen = False
    for rank in range(dp_size):
        full = take(build_loader(cfg, rank, dp_size, num_workers=0), 9)
        for k in (1, 4):
            first = build_loader(cfg, rank, dp_size, num_workers=workers)
            head = take(first, k)
            state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
            assert state["batches"] == k
            split_seen |= state["pending"] is not None and state["pending"]["start"] > 0
            resumed = build_loader(cfg, rank, dp_size, num_workers=workers)
            resumed.load_state_dict(state)
            assert_same_batches(head + take(resumed, 9 - k), full)
    assert split_seen  # at least one resume happened in the middle of a split sample


def test_state_after_worker_prefetch_is_the_consumed_position(demo):
    loader = build_loader(config(demo), num_workers=2)
    it = iter(loader)
    next(it)
    next(it)  # the workers have run ahead by now; the state must not follow them
    assert loader.state_dict()["batches"] == 2
    rest = list(itertools.islice(it, 3))
    assert loader.state_dict()["batches"] == 5
    again = build_loader(config(demo), num_workers=0)
    assert_same_batches(rest, take(again, 5)[2:])


def test_same_seed_same_order_and_ranks_differ(demo):
    cfg = config(demo)
    assert_same_batches(take(build_loader(cfg, num_workers=0), 3), take(build_loader(cfg, num_workers=0), 3))
    other_seed = take(build_loader(cfg, seed=7, num_workers=0), 3)
    assert not torch.equal(other_seed[0]["tokens"], take(build_loader(cfg, num_workers=0), 1)[0]["tokens"])
    rank1 = take(build_loader(cfg, 1, 2, num_workers=0), 1)[0]
    assert not torch.equal(rank1["tokens"], take(build_loader(cfg, 0, 2, num_workers=0), 1)[0]["tokens"])


@pytest.mark.parametrize("dp_size", [2, 3])
def test_rank_shares_are_disjoint_and_cover_each_epoch(dp_size):
    sizes = [10, 7, 5]
    per_rank = []
    for rank in range(dp_size):
        sampler = MixtureSampler(sizes, [0.45, 0.45, 0.1], seed=3, dp_rank=rank, dp_size=dp_size)
        shares = [len(range(rank, n, dp_size)) for n in sizes]
        epoch_one: set[tuple[int, int]] = set()
        while any(c < s for c, s in zip(sampler.cursors, shares)):
            d, index = sampler.next()
            if sampler.cursors[d] <= shares[d]:  # the draw was still in epoch one
                assert (d, index) not in epoch_one  # no repeats within an epoch
                epoch_one.add((d, index))
        per_rank.append(epoch_one)
    for a, b in itertools.combinations(per_rank, 2):
        assert not a & b
    assert set().union(*per_rank) == {(d, i) for d, n in enumerate(sizes) for i in range(n)}


def test_mixture_follows_the_weights(demo, tmp_path):
    prepare(demo / "raw" / "demo.jsonl", demo / "raw" / "images", tmp_path / "copy", progress=False)
    cfg = config(demo, f"data.caption={{{tmp_path / 'copy'}: 3.0}}")
    datasets, probs = datasets_from_config(cfg.data)
    by_name = dict(zip([d.name for d in datasets], probs))
    assert by_name[f"{demo}:interleaved"] == pytest.approx(0.45)
    assert by_name[f"{demo}:caption"] == pytest.approx(0.45 * 1 / 4)
    assert by_name[f"{tmp_path / 'copy'}:caption"] == pytest.approx(0.45 * 3 / 4)
    assert by_name[f"{demo}:text"] == pytest.approx(0.10)

    sampler = MixtureSampler([len(d) for d in datasets], probs, seed=0, dp_rank=0, dp_size=1)
    counts = np.bincount([sampler.next()[0] for _ in range(20_000)], minlength=len(datasets)) / 20_000
    assert np.allclose(counts, probs, atol=0.015)

    no_text = datasets_from_config(config(demo, "data.text_weight=0").data)[1]
    assert sum(no_text) == pytest.approx(1.0) and len(no_text) == 2


def test_datasets_list_is_the_per_kind_maps_in_one_list(demo, tmp_path):
    """data.datasets names the same mixture as the per-kind maps: a folder's one kind, or every
    kind it holds (auto), at a weight; a folder named twice for a kind is refused by name."""
    prepare(demo / "raw" / "demo.jsonl", demo / "raw" / "images", tmp_path / "copy", progress=False)
    copy = tmp_path / "copy"

    def mixture(*overrides):
        cfg = load_config("tiny", [f"data.tokenizer={demo / 'tokenizer.model'}", *overrides])
        validate(cfg)
        datasets, probs = datasets_from_config(cfg.data)
        return dict(zip([d.name for d in datasets], probs))

    maps = mixture(f"data.path={demo}", f"data.caption={{{copy}: 3.0}}", f"data.text={{{copy}: 0.5}}")
    listed = mixture(f"data.path={demo}", f"data.datasets=[{{path: {copy}, kind: caption, weight: 3}}, "
                                          f"{{path: {copy}, kind: text, weight: 0.5}}]")
    assert listed == maps and len(maps) == 5
    # auto: every kind the folder holds, at the entry's weight
    assert mixture(f"data.datasets=[{{path: {demo}}}, {{path: {copy}, weight: 3}}]") == mixture(
        *(f"data.{kind}={{{demo}: 1, {copy}: 3}}" for kind in ("interleaved", "caption", "text")))
    with pytest.raises(DataError, match=r"data.datasets\[0\]: .* is already a caption dataset"):
        mixture(f"data.path={copy}", f"data.datasets=[{{path: {copy}, kind: caption}}]")
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].kind='photos' is unknown"):
        mixture(f"data.datasets=[{{path: {copy}, kind: photos}}]")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) data.datasets\[0\].wieght"):
        mixture(f"data.datasets=[{{path: {copy}, wieght: 2}}]")


def test_building_reads_no_samples(demo):
    formats._SHARDS.__init__()  # forget shards opened by earlier tests in this process
    build_loader(config(demo), num_workers=0)
    assert not formats._SHARDS.open


def test_configuration_errors_are_clear(demo, tmp_path):
    loader = build_loader(config(demo), num_workers=0)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="dp_size"):
        build_loader(config(demo), 0, 2, num_workers=0).load_state_dict(state)
    with pytest.raises(DataError, match="seq_length"):
        build_loader(config(demo, "data.seq_length=64"), num_workers=0).load_state_dict(state)
    with pytest.raises(DataError, match="no training data"):
        build_loader(load_config("tiny", [f"data.tokenizer={demo / 'tokenizer.model'}"]))
    with pytest.raises(DataError, match="not a prepared data folder"):
        build_loader(config(tmp_path))
    with pytest.raises(DataError, match="data.text_weight=-1.0 must be >= 0"):
        build_loader(config(demo, "data.text_weight=-1"))
    with pytest.raises(DataError, match="data.num_workers=-1"):
        build_loader(config(demo, "data.num_workers=-1"))


def test_truncated_shard_is_rejected_with_a_message(demo, tmp_path):
    copy = tmp_path / "data"
    prepare(demo / "raw" / "demo.jsonl", demo / "raw" / "images", copy, progress=False)
    shard = copy / "caption-u000000-0000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    cfg = load_config("tiny", [f"data.path={copy}", f"data.tokenizer={demo / 'tokenizer.model'}"])
    with pytest.raises(DataError, match="caption-u000000-0000.tar is 5000 bytes .* truncated"):
        build_loader(cfg)


def test_undecodable_images_are_blank_and_counted(demo, tmp_path):
    """A shard damaged after preparation (same size, image bytes overwritten): each image that
    no longer decodes becomes the mean colour and is counted; the token stream is unchanged."""
    copy = tmp_path / "data"
    prepare(demo / "raw" / "demo.jsonl", demo / "raw" / "images", copy, progress=False)
    for shard in copy.glob("*.tar"):
        with tarfile.open(shard) as tar:
            images = [(m.offset_data, m.size) for m in tar.getmembers() if ".img" in m.name]
        with open(shard, "r+b") as f:
            for offset, size in images:
                f.seek(offset)
                f.write(b"\0" * size)
    intact = take(build_loader(config(demo), num_workers=0), 6)
    damaged = take(build_loader(config(copy, f"data.tokenizer={demo / 'tokenizer.model'}"), num_workers=0), 6)
    assert sum(int(b["num_images"].sum()) for b in damaged) > 0
    for a, b in zip(intact, damaged):
        assert int(a["skipped_images"]) == 0 and int(b["skipped_images"]) == int(b["num_images"].sum())
        assert b["images"].shape == a["images"].shape and not b["images"].any()
        for key in ("tokens", "labels", "loss_mask", "segment_ids"):
            assert torch.equal(a[key], b[key])


def test_document_with_more_images_than_a_sequence_holds(demo, tmp_path):
    segments = [{"text": "a long picture book."}]
    names = sorted(p.name for p in (demo / "raw" / "images").iterdir())[:40]
    segments += [{"image": name} for name in names] + [{"text": "the end."}]  # 160 image tokens in a row
    (tmp_path / "book.jsonl").write_text(json.dumps({"type": "interleaved", "segments": segments}) + "\n")
    result = prepare(tmp_path / "book.jsonl", demo / "raw" / "images", tmp_path / "data", progress=False)
    assert result.written == 1
    cfg = load_config("tiny", [f"data.path={tmp_path / 'data'}", f"data.tokenizer={demo / 'tokenizer.model'}",
                               "training.micro_batch_size=1"])
    per_row = []
    for batch in take(build_loader(cfg, num_workers=0), 4):
        n = int(batch["num_images"][0])
        assert int((batch["tokens"] == 4).sum()) == 4 * n and batch["images"].shape[0] == n
        per_row.append(n)
    assert max(per_row) == 16  # the image cap binds, never exceeded
    assert sum(per_row[:3]) >= 40  # and the whole document is spread over the first rows


def test_text_only_loader_matches_and_decodes_nothing(demo):
    cfg = config(demo)
    full = take(build_loader(cfg, num_workers=0), 4)
    tokens_only = take(build_loader(cfg, num_workers=0, images=False), 4)
    assert any(b["images"].shape[0] for b in full)
    for a, b in zip(full, tokens_only):
        assert b["images"] is None
        for key in ("tokens", "labels", "loss_mask", "segment_ids", "position_ids", "num_images"):
            assert torch.equal(a[key], b[key])


def test_held_out_samples_are_disjoint_from_training_and_independent_of_seed_and_location(demo, tmp_path):
    cfg = config(demo, "data.valid_fraction=0.2")
    training, _ = datasets_from_config(cfg.data)
    valid = ValidationData(cfg)
    assert valid.kinds == ["interleaved", "caption", "text"]
    assert valid.weights == pytest.approx({"interleaved": 0.45, "caption": 0.45, "text": 0.10})
    for train_share, (held, _) in zip(training, (pair for kind in valid.kinds for pair in valid.per_kind[kind])):
        n = len(train_share.dataset)
        assert len(held) == int(np.ceil(0.2 * n)) and len(train_share) + len(held) == n
        assert set(train_share.indices.tolist()).isdisjoint(held.indices.tolist())
        # The training loader reads only the training share: every sample it draws is one of it.
        sampler = MixtureSampler([len(train_share)], [1.0], seed=3, dp_rank=0, dp_size=1)
        drawn = {int(train_share.indices[sampler.next()[1]]) for _ in range(3 * len(train_share))}
        assert drawn == set(train_share.indices.tolist())
    # Another seed changes the training order, not the held-out samples; nor does moving the data.
    shutil.copytree(demo, tmp_path / "moved")
    for kind in ("caption", "text"):
        here = hold_out(ShardedDataset(demo, kind), 0.2)[1].indices
        assert np.array_equal(here, hold_out(ShardedDataset(tmp_path / "moved", kind), 0.2)[1].indices)
    reseeded = ValidationData(config(demo, "data.valid_fraction=0.2", "data.seed=99", "training.seed=7"))
    assert all(np.array_equal(a.indices, b.indices) for kind in valid.kinds
               for (a, _), (b, _) in zip(valid.per_kind[kind], reseeded.per_kind[kind]))


def test_validation_batches_are_the_same_every_time_and_at_every_data_parallel_size(demo):
    cfg = config(demo, "data.valid_fraction=0.2", "training.eval_iters=2")
    whole = ValidationData(cfg)
    first, again = (list(whole.batches("interleaved")) for _ in range(2))
    assert len(first) == 2 * 8 // 2  # eval_iters global batches of 8 rows, 2 per micro-batch
    assert_same_batches(first, again)
    # DP rank r of 2 gets micro-batches r, r + 2, ...: together the same set as one rank.
    shares = [list(ValidationData(cfg, rank, 2).batches("interleaved")) for rank in range(2)]
    assert_same_batches([b for pair in zip(*shares) for b in pair], first)


def test_validation_data_errors_are_clear(demo, tmp_path):
    with pytest.raises(ConfigError, match="data.valid_path and data.valid_fraction both"):
        validate(config(demo, "data.valid_fraction=0.1", f"data.valid_path={demo}"))
    with pytest.raises(ConfigError, match="data.valid_fraction must be >= 0 and < 1"):
        validate(config(demo, "data.valid_fraction=1.0"))
    only_text = config(demo, f"data.valid_path={demo}", "data.interleaved_weight=0", "data.caption_weight=0")
    assert ValidationData(only_text).kinds == ["text"]
    assert not ValidationData(config(demo))  # no validation data: no evaluation


def test_a_folder_prepared_before_units_loads_with_todays_samples(demo, tmp_path):
    """Folders written before shards were named by input unit (tests/data/prepared-v1) still
    load: every kind holds the samples, in the same order, that today's prepare writes, and the
    loader makes the same batches of them."""
    fixture = ROOT / "tests" / "data" / "prepared-v1"
    prepare(fixture / "input" / "corpus.jsonl", fixture / "input" / "images", tmp_path, samples_per_shard=3)
    old_names = {s["name"] for info in load_manifest(fixture / "prepared")["kinds"].values() for s in info["shards"]}
    assert old_names and all(re.fullmatch(r"[a-z]+-\d{6}\.tar", n) for n in old_names)
    assert formats.verify_checksums(fixture / "prepared") == []

    def contents(root, kind):
        dataset = ShardedDataset(root, kind)
        return [
            [read_member(*seg["image"]) if "image" in seg else seg for seg in dataset[i]["segments"]]
            for i in range(len(dataset))
        ]

    for kind in ("caption", "interleaved", "text"):
        old, new = contents(fixture / "prepared", kind), contents(tmp_path, kind)
        assert len(old) == 4 and old == new, kind
    batches = [take(build_loader(config(demo, f"data.path={root}"), 0, 1), 4) for root in (fixture / "prepared", tmp_path)]
    assert_same_batches(*batches)
