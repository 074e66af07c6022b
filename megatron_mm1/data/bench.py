"""`mm1 data bench`: loader throughput (images, tokens and sequences per second)."""

from __future__ import annotations

import time

from megatron_mm1.data.loader import build_loader


def bench(cfg, num_workers: int, batches: int = 50, warmup: int = 2) -> dict:
    """Time `batches` micro-batches after `warmup` ones (worker start-up is not throughput).

    tokens_per_s counts sample tokens (padding excluded); images_per_s decoded, resized images.
    """
    loader = iter(build_loader(cfg, num_workers=num_workers))
    for _ in range(warmup):
        next(loader)
    images = tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
        images += batch["images"].shape[0]
        tokens += int((batch["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    sequences = batches * cfg.training.micro_batch_size
    return {"workers": num_workers, "batches": batches, "seconds": round(seconds, 4),
            "images_per_s": images / seconds, "tokens_per_s": tokens / seconds,
            "sequences_per_s": sequences / seconds}
