"""The training loader: mixture -> tokenise -> pack (calling process) -> decode images (workers).

Planning (which samples, tokenisation, packing) is cheap and runs in the calling process, one step
at a time, so its state after every micro-batch is known exactly and travels with the batch.
Decoding and resizing images is the expensive part and runs in torch DataLoader workers, which
return batches in order. `state_dict()` is the state after the last batch handed to the caller,
however far the workers have run ahead, so a restored loader continues exactly where the
uninterrupted one would have.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Optional

import numpy as np
import torch

from megatron_mm1.data.formats import KINDS, DataError, read_member
from megatron_mm1.data.images import ImageRejected, load_image, preprocess
from megatron_mm1.data.mixture import MixtureSampler, datasets_from_config, validation_datasets
from megatron_mm1.data.packing import Packer, encode_sample, row_arrays
from megatron_mm1.data.tokenizer import load_tokenizer

STATE_VERSION = 1


class _Planner:
    """Yields micro-batch plans: the token arrays, the image references, and the state after them."""

    def __init__(self, cfg, datasets: list, probs: list[float], seed: int, dp_rank: int, dp_size: int, tokenizer):
        self.cfg, self.datasets, self.tokenizer = cfg, datasets, tokenizer
        self.mixture = MixtureSampler([len(d) for d in datasets], probs, seed, dp_rank, dp_size,
                                      [d.name for d in datasets])
        m = cfg.model
        self.packer = Packer(lambda: list(self.mixture.next()), self._load, cfg.data.seq_length,
                             m.max_images_per_sequence, m.connector.num_image_tokens)
        self.batches = 0

    def _load(self, ref: list[int]):
        d, index = ref
        return encode_sample(self.datasets[d][index], self.tokenizer, self.cfg.model.connector.num_image_tokens)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "mixture": self.mixture.state_dict(), "pending": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]
        self.mixture.load_state_dict(state["mixture"])
        self.packer.load_state_dict(state["pending"])

    def __iter__(self) -> Iterator[dict]:
        image_token_id = self.cfg.model.image_token_id
        seq_length = self.cfg.data.seq_length
        while True:
            rows = [self.packer.next_row() for _ in range(self.cfg.training.micro_batch_size)]
            per_row = [row_arrays(r, seq_length, image_token_id) for r in rows]
            plan: dict[str, Any] = {k: np.stack([a[k] for a in per_row]) for k in per_row[0]}
            plan["num_images"] = np.asarray([sum(len(c.images) for c in r) for r in rows], dtype=np.int64)
            plan["image_refs"] = [img for r in rows for c in r for img in c.images]
            self.batches += 1
            plan["state"] = self.state_dict()
            yield plan


class _Pixels(torch.utils.data.Dataset):
    """Turns a plan into the contract's tensors; runs in the loader's worker processes."""

    def __init__(self, image_size: int, arch: str, decode: bool = True):
        self.image_size, self.arch = image_size, arch
        self.decode = decode

    def _image(self, ref: tuple[str, str]) -> Optional[np.ndarray]:
        """The preprocessed image, or None when its bytes no longer decode."""
        shard, member = ref
        try:
            return preprocess(load_image(read_member(shard, member)), self.image_size, self.arch)
        except ImageRejected as e:  # validated at preparation, so the shard was damaged since
            print(f"WARNING: {shard}: {member} cannot be decoded ({e}); a blank image takes its place "
                  "(counted as skipped_images; `mm1 data verify` finds damaged shards)", file=sys.stderr)
            return None

    def __getitem__(self, plan: dict) -> dict:
        batch = {k: torch.from_numpy(plan[k]) for k in
                 ("tokens", "labels", "loss_mask", "segment_ids", "position_ids", "num_images")}
        batch["skipped_images"] = torch.tensor(0)
        if self.decode:
            s = self.image_size
            pixels = [self._image(ref) for ref in plan["image_refs"]]
            batch["skipped_images"] = torch.tensor(sum(p is None for p in pixels))
            # Zeros are the mean colour after normalisation.
            pixels = [np.zeros((3, s, s), np.float32) if p is None else p for p in pixels]
            batch["images"] = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, 3, s, s)
        else:
            batch["images"] = None
        batch["state"] = plan["state"]
        return batch


def _identity(x):
    return x


def _decoded(plans, cfg, images: bool, num_workers: int, generator: Optional[torch.Generator] = None):
    """The plans' batches, their images decoded in `num_workers` worker processes (in order)."""
    v = cfg.model.vision
    pixels = _Pixels(v.image_size, v.arch, decode=images)
    if num_workers == 0 or not images:
        return map(pixels.__getitem__, plans)
    # Pinned batches copy to the GPU asynchronously (device.to_device).
    return torch.utils.data.DataLoader(pixels, sampler=plans, batch_size=None, collate_fn=_identity,
                                       num_workers=num_workers, prefetch_factor=2,
                                       pin_memory=torch.cuda.is_available(), generator=generator)


class MultimodalLoader:
    """An endless iterator of micro-batches for one data-parallel rank (see packing.py for the contract).

    state_dict() -> {"version", "seed", "dp_rank", "dp_size", "seq_length", "micro_batch_size",
    "datasets", "batches", "mixture": {"draws", "cursors"}, "pending": None | {"ref", "start"}},
    plain JSON. load_state_dict() refuses a state saved under a different data layout.
    """

    def __init__(self, cfg, dp_rank: int = 0, dp_size: int = 1, seed: Optional[int] = None,
                 num_workers: Optional[int] = None, images: bool = True):
        self.cfg = cfg
        self.images = images
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed if seed is not None else (cfg.data.seed if cfg.data.seed is not None else cfg.training.seed)
        self.num_workers = cfg.data.num_workers if num_workers is None else num_workers
        if self.num_workers < 0:
            raise DataError(f"data.num_workers={self.num_workers} must be >= 0 (0: no worker processes)")
        self.seq_length, self.micro_batch_size = cfg.data.seq_length, cfg.training.micro_batch_size
        self.datasets, self.probs = datasets_from_config(cfg.data)
        self.tokenizer = load_tokenizer(cfg)
        self._state = self._planner().state_dict()  # also checks the datasets against dp_size

    def _planner(self) -> _Planner:
        return _Planner(self.cfg, self.datasets, self.probs, self.seed, self.dp_rank, self.dp_size, self.tokenizer)

    def _layout(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "seq_length": self.seq_length, "micro_batch_size": self.micro_batch_size,
                "datasets": [d.name for d in self.datasets]}

    def state_dict(self) -> dict:
        return {**self._layout(), **self._state}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._layout()}
        if saved != self._layout():
            diff = {k: (saved[k], v) for k, v in self._layout().items() if saved[k] != v}
            raise DataError(f"cannot resume the data loader: (saved, current) differ in {diff}; "
                            "resume with the same data configuration, seed and data-parallel layout")
        planner = self._planner()
        planner.load_state_dict(state)  # validates it before we accept it
        self._state = planner.state_dict()

    def __iter__(self) -> Iterator[dict]:
        planner = self._planner()
        planner.load_state_dict(self._state)
        for batch in _decoded(planner, self.cfg, self.images, self.num_workers):
            self._state = batch.pop("state")
            yield batch


def build_loader(cfg, dp_rank: int = 0, dp_size: int = 1, seed: Optional[int] = None,
                 num_workers: Optional[int] = None, images: bool = True) -> MultimodalLoader:
    """The micro-batch iterator for data-parallel rank `dp_rank` of `dp_size`.

    Builds only indexes (manifests, tokenizer): nothing is read or decoded until iteration, so ranks
    that feed no data can skip building it at no cost. `seed` defaults to cfg.data.seed, then
    cfg.training.seed; `num_workers` to cfg.data.num_workers. With `images=False` (pipeline stages
    after the first, which hold no vision encoder) no image is read or decoded and the batches'
    `images` is None; the token arrays are the same.
    """
    return MultimodalLoader(cfg, dp_rank, dp_size, seed, num_workers, images)


# The validation batches' own seed: the same batches whatever training.seed or data.seed.
VALIDATION_SEED = 0


class ValidationData:
    """The validation micro-batches of each kind for one data-parallel rank: the first
    eval_iters global batches packed from that kind's validation datasets (mixed by their
    weights), the same at every evaluation and, as a set, at every layout (micro-batch i of a
    global batch goes to DP rank i % dp_size). `kinds` and `weights` (each kind's share of the
    training mixture) are known on every rank; batches are read only where iterated.
    """

    def __init__(self, cfg, dp_rank: int = 0, dp_size: int = 1, images: bool = True):
        self.cfg, self.dp_rank, self.dp_size, self.images = cfg, dp_rank, dp_size, images
        datasets, probs = validation_datasets(cfg.data)
        self.kinds = [k for k in KINDS if any(d.kind == k for d in datasets)]
        self.per_kind = {k: [(d, p) for d, p in zip(datasets, probs) if d.kind == k] for k in self.kinds}
        self.weights = {k: sum(p for _, p in self.per_kind[k]) for k in self.kinds}
        self._plans: dict[str, list[dict]] = {}

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def _plan(self, kind: str) -> list[dict]:
        """This rank's share of the kind's micro-batch plans (packed once, kept)."""
        if kind not in self._plans:
            t = self.cfg.training
            per_global = t.global_batch_size // t.micro_batch_size
            datasets = [d for d, _ in self.per_kind[kind]]
            probs = [p / self.weights[kind] for _, p in self.per_kind[kind]]
            planner = iter(_Planner(self.cfg, datasets, probs, VALIDATION_SEED, 0, 1, load_tokenizer(self.cfg)))
            plans = [next(planner) for _ in range(t.eval_iters * per_global)]
            self._plans[kind] = [plan for i, plan in enumerate(plans) if i % self.dp_size == self.dp_rank]
        return self._plans[kind]

    def batches(self, kind: str) -> Iterator[dict]:
        """The kind's micro-batches for this rank, images decoded. A fixed generator: the
        loader's workers take no draw from the global RNG, which training's RNG state owns."""
        for batch in _decoded(self._plan(kind), self.cfg, self.images, self.cfg.data.num_workers,
                              generator=torch.Generator().manual_seed(VALIDATION_SEED)):
            batch.pop("state")
            yield batch
