"""Weighted sampling across datasets, with disjoint per-rank shares and counter-based randomness.

Every random choice is a pure function of (seed, counter): the k-th draw of a rank uses a
generator seeded with (seed, rank, k), and a dataset's order in epoch e is a permutation seeded
with (seed, dataset, e). The sampler's whole state is therefore a few integers, which is what
makes resumption exact and cheap.
"""

from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_mm1.data.formats import KINDS, DataError, ShardedDataset, load_manifest

_DRAW, _ORDER, _HOLD_OUT = 0, 1, 2  # seed-sequence tags, so the streams never share a seed


def datasets_from_config(data_cfg) -> tuple[list, list[float]]:
    """The training datasets named by cfg.data and each one's sampling probability.

    Kind weights (interleaved/caption/text/chat_weight) are split among that kind's datasets in
    proportion to their own weights, then renormalised over the kinds that have data. With
    data.valid_fraction each dataset is its training share (hold_out).
    """
    datasets, probs = _training_corpus(data_cfg)
    if data_cfg.valid_fraction:
        datasets = [hold_out(d, data_cfg.valid_fraction)[0] for d in datasets]
    return datasets, probs


def _training_corpus(data_cfg) -> tuple[list[ShardedDataset], list[float]]:
    """The datasets data.path, data.datasets and the per-kind folders name, whole, and their
    probabilities."""
    per_kind: dict[str, dict[str, float]] = {k: dict(getattr(data_cfg, k)) for k in KINDS}
    if data_cfg.path:
        for kind in load_manifest(data_cfg.path)["kinds"]:
            per_kind[kind].setdefault(data_cfg.path, 1.0)
    for i, entry in enumerate(data_cfg.datasets):
        kinds = load_manifest(entry.path)["kinds"] if entry.kind == "auto" else [entry.kind]
        for kind in kinds:
            if entry.path in per_kind[kind]:
                raise DataError(f"data.datasets[{i}]: {entry.path} is already a {kind} dataset (data.path, "
                                f"data.{kind} or an earlier entry); name each folder once per kind")
            per_kind[kind][entry.path] = entry.weight
    datasets, probs = _weighted(per_kind, data_cfg)
    if not datasets:
        raise DataError("no training data: set data.path, data.datasets or data.interleaved/caption/text to "
                        "prepared folders (see `mm1 data prepare`)")
    return datasets, probs


def validation_datasets(data_cfg) -> tuple[list, list[float]]:
    """The validation datasets (data.valid_path's kinds, or every training dataset's held-out
    share) and their probabilities, weighted as in training; ([], []) without validation data."""
    if data_cfg.valid_path:
        per_kind: dict[str, dict[str, float]] = {k: {} for k in KINDS}
        for kind in load_manifest(data_cfg.valid_path)["kinds"]:
            per_kind[kind][data_cfg.valid_path] = 1.0
        datasets, probs = _weighted(per_kind, data_cfg)
        if not datasets:
            raise DataError(f"data.valid_path={data_cfg.valid_path} holds no samples of a kind with a "
                            "weight > 0; prepare some or unset it")
        return datasets, probs
    if data_cfg.valid_fraction:
        datasets, probs = _training_corpus(data_cfg)
        return [hold_out(d, data_cfg.valid_fraction)[1] for d in datasets], probs
    return [], []


def _weighted(per_kind: dict[str, dict[str, float]], data_cfg) -> tuple[list[ShardedDataset], list[float]]:
    datasets, probs = [], []
    manifests: dict[str, dict] = {}
    for kind in KINDS:
        kind_weight = getattr(data_cfg, f"{kind}_weight")
        if kind_weight < 0:
            raise DataError(f"data.{kind}_weight={kind_weight} must be >= 0")
        entries = per_kind[kind]
        for path, w in entries.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise DataError(f"data.{kind}: weight {w!r} of {path} must be a number >= 0")
        total = sum(entries.values())
        for path, w in sorted(entries.items()):
            if w == 0 or kind_weight == 0:
                continue
            manifests.setdefault(path, load_manifest(path))
            ds = ShardedDataset(path, kind, manifests[path])
            if len(ds) == 0:
                raise DataError(f"data.{kind}: {path} holds no {kind} samples; remove it or prepare some")
            datasets.append(ds)
            probs.append(kind_weight * w / total)
    if not datasets:
        return [], []
    probs_arr = np.asarray(probs, dtype=np.float64)
    return datasets, list(probs_arr / probs_arr.sum())


class Share:
    """The training or the held-out share of a dataset (data.valid_fraction): ceil(fraction x
    size) samples drawn at random are held out, at least one and never all. The draw depends
    only on the dataset's shards (names, sample counts), not on the run's seed or the folder's
    location, so runs of one corpus validate alike. Indexed 0..len-1 in the dataset's order;
    the draw is made on first access (ranks that read no data never make it)."""

    def __init__(self, dataset: ShardedDataset, fraction: float, held_out: bool):
        n = len(dataset)
        if n < 2:
            raise DataError(f"{dataset.name} has {n} sample(s): too few to hold some out for validation "
                            "(data.valid_fraction); use data.valid_path")
        self.dataset, self.fraction, self.held_out, self.kind = dataset, fraction, held_out, dataset.kind
        self.held = min(n - 1, math.ceil(fraction * n))
        self.name = f"{dataset.name}[valid {fraction:g}]" if held_out else f"{dataset.name}[train {1 - fraction:g}]"

    @functools.cached_property
    def indices(self) -> np.ndarray:
        d = self.dataset
        identity = ",".join(Path(s).name for s in d.shards) + f":{d.kind}:{len(d)}"
        order = np.random.default_rng([_HOLD_OUT, zlib.crc32(identity.encode())]).permutation(len(d))
        return np.sort(order[: self.held] if self.held_out else order[self.held :])

    def __len__(self) -> int:
        return self.held if self.held_out else len(self.dataset) - self.held

    def __getitem__(self, index: int) -> dict:
        return self.dataset[int(self.indices[index])]


def hold_out(dataset: ShardedDataset, fraction: float) -> tuple[Share, Share]:
    """(training share, held-out share) of `dataset`."""
    return Share(dataset, fraction, held_out=False), Share(dataset, fraction, held_out=True)


class MixtureSampler:
    """Draws (dataset index, sample index) pairs for one data-parallel rank.

    Rank r reads positions r, r + dp_size, ... of each dataset's per-epoch permutation, so the ranks'
    shares are disjoint within an epoch and together cover the dataset.
    """

    def __init__(self, sizes: list[int], probs: list[float], seed: int, dp_rank: int, dp_size: int,
                 names: Optional[list[str]] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        for d, n in enumerate(sizes):
            if n < dp_size:
                name = names[d] if names else f"#{d}"
                raise DataError(f"dataset {name} has {n} samples, fewer than the {dp_size} data-parallel ranks")
        self.sizes, self.probs = sizes, np.asarray(probs)
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.draws = 0
        self.cursors = [0] * len(sizes)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _share(self, d: int) -> int:
        return len(range(self.dp_rank, self.sizes[d], self.dp_size))

    def _order(self, d: int, epoch: int) -> np.ndarray:
        if (d, epoch) not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != d}  # keep one epoch per dataset
            rng = np.random.default_rng([self.seed, _ORDER, d, epoch])
            self._orders[d, epoch] = rng.permutation(self.sizes[d])
        return self._orders[d, epoch]

    def sample_at(self, d: int, cursor: int) -> int:
        """The sample this rank reads at position `cursor` of dataset d's stream."""
        epoch, i = divmod(cursor, self._share(d))
        return int(self._order(d, epoch)[self.dp_rank + i * self.dp_size])

    def next(self) -> tuple[int, int]:
        rng = np.random.default_rng([self.seed, _DRAW, self.dp_rank, self.draws])
        d = int(rng.choice(len(self.sizes), p=self.probs))
        index = self.sample_at(d, self.cursors[d])
        self.draws += 1
        self.cursors[d] += 1
        return d, index

    def state_dict(self) -> dict:
        return {"draws": self.draws, "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["cursors"]) != len(self.sizes):
            raise DataError(f"the saved data state has {len(state['cursors'])} datasets, this loader "
                            f"{len(self.sizes)}; resume with the same data configuration")
        self.draws = int(state["draws"])
        self.cursors = [int(c) for c in state["cursors"]]
