"""Synthetic micro-batches in the data pipeline's batch contract (megatron_mm1.data.packing):
for tests, `mm1 demo` before real data, and benchmarks. Deterministic for a seed."""

from __future__ import annotations

import torch

from megatron_mm1.config import Config

PAD_ID = 3


def synthetic_microbatch(
    cfg: Config, seed: int, images_per_row: list[int], samples_per_row: int = 2
) -> dict[str, torch.Tensor]:
    """One micro-batch: each row packs `samples_per_row` samples plus trailing padding, with
    `images_per_row[r]` images at random positions of row r (each image is N `<image>` tokens)."""
    m = cfg.model
    b, s, n = len(images_per_row), cfg.data.seq_length, m.connector.num_image_tokens
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(m.image_token_id + 1, m.llm.vocab_size, (b, s), generator=gen)
    segment_ids = torch.zeros(b, s, dtype=torch.int32)
    position_ids = torch.zeros(b, s, dtype=torch.long)
    used = s - s // 8  # the rest is padding
    bounds = torch.linspace(0, used, samples_per_row + 1).long().tolist()
    for r, count in enumerate(images_per_row):
        for k in range(samples_per_row):
            lo, hi = bounds[k], bounds[k + 1]
            segment_ids[r, lo:hi] = k + 1
            position_ids[r, lo:hi] = torch.arange(hi - lo)
        slots = used // n
        starts = torch.randperm(slots - 1, generator=gen)[:count] + 1
        for start in starts.tolist():
            tokens[r, start * n : (start + 1) * n] = m.image_token_id
        tokens[r, used:] = PAD_ID
    same_next = torch.zeros(b, s, dtype=torch.bool)
    same_next[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    labels = torch.full((b, s), PAD_ID, dtype=torch.long)
    labels[:, :-1] = tokens[:, 1:]
    labels[~same_next] = PAD_ID
    loss_mask = (same_next & (labels != m.image_token_id)).float()
    size = m.vision.image_size
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "position_ids": position_ids,
        "images": torch.randn(sum(images_per_row), 3, size, size, generator=gen),
        "num_images": torch.tensor(images_per_row, dtype=torch.long),
    }
