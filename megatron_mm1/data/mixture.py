"""Weighted sampling across datasets, with disjoint per-rank shares and counter-based randomness.

Every random choice is a pure function of (seed, counter): the k-th draw of a rank uses a
generator seeded with (seed, rank, k), and a dataset's order in epoch e is a permutation seeded
with (seed, dataset, e). The sampler's whole state is therefore a few integers, which is what
makes resumption exact and cheap.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from megatron_mm1.data.formats import KINDS, DataError, ShardedDataset, load_manifest

_DRAW, _ORDER = 0, 1  # seed-sequence tags, so the two streams never share a seed


def datasets_from_config(data_cfg) -> tuple[list[ShardedDataset], list[float]]:
    """The datasets named by cfg.data and each one's sampling probability.

    Kind weights (interleaved/caption/text_weight) are split among that kind's datasets in
    proportion to their own weights, then renormalised over the kinds that have data.
    """
    per_kind: dict[str, dict[str, float]] = {k: dict(getattr(data_cfg, k)) for k in KINDS}
    if data_cfg.path:
        for kind in load_manifest(data_cfg.path)["kinds"]:
            per_kind[kind].setdefault(data_cfg.path, 1.0)
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
        raise DataError("no training data: set data.path or data.interleaved/caption/text to prepared folders "
                        "(see `mm1 data prepare`)")
    probs_arr = np.asarray(probs, dtype=np.float64)
    return datasets, list(probs_arr / probs_arr.sum())


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
