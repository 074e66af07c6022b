"""Sample -> token stream, and greedy packing of token streams into fixed-length rows.

The batch contract (what the model consumes). A micro-batch is a dict of torch tensors, with
b = training.micro_batch_size, s = data.seq_length, H = W = model.vision.image_size and
N = model.connector.num_image_tokens:

    tokens        int64   [b, s]  text ids; each image is N consecutive <image> ids
                                  (model.image_token_id); padding is pad id 3.
    labels        int64   [b, s]  labels[i] = tokens[i+1] when i+1 is in the same sample, else 3.
    loss_mask     float32 [b, s]  1.0 where labels[i] is a text token of the same sample (not
                                  <image>, not padding, not across a sample boundary) that
                                  carries the loss (in chats: the assistants' answers), else 0.0.
    segment_ids   int32   [b, s]  1..k for the k samples packed in the row, 0 for padding.
    position_ids  int64   [b, s]  position within its sample, restarting at 0 per sample.
    images        float32 [num_images, 3, H, W]  CLIP-normalised, in order of appearance across the
                                  micro-batch (row 0 left to right, then row 1, ...); [0, 3, H, W]
                                  when there are none.
    num_images    int64   [b]     images per row.

Attention is block-diagonal causal: i may attend j iff j <= i and both lie in the same run of equal
segment_ids (padding is one run of its own; see megatron_mm1/models/attention.py).

Packing rules: a sample that fits in a row is never split (the row is closed and padded
instead); a sample longer than a row (in tokens or in images) is cut into consecutive pieces, each
its own segment, filling the current row first. A cut never falls inside an image's N tokens, and
no row holds more than model.max_images_per_sequence images.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from megatron_mm1.data.formats import DataError
from megatron_mm1.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


@dataclass
class Encoded:
    """One sample as a token stream; image k occupies tokens[image_pos[k] : image_pos[k] + N]."""

    tokens: np.ndarray  # int64
    image_pos: list[int]
    images: list[Any]  # image references, in order (opaque here: (shard, member) in the loader)
    loss: np.ndarray  # bool per token: predicting it carries the loss


def encode_sample(sample: dict, tokenizer: Tokenizer, num_image_tokens: int) -> Encoded:
    """bos, then each segment (text ids, or N <image> ids), then eos. Text carries the loss
    unless its segment says "loss": false (chat prompts); eos does when the last text does."""
    ids, loss, image_pos, images = [BOS_ID], [False], [], []
    text_loss = True
    for seg in sample["segments"]:
        if "image" in seg:
            image_pos.append(len(ids))
            images.append(seg["image"])
            ids.extend([tokenizer.image_token_id] * num_image_tokens)
            loss.extend([False] * num_image_tokens)
        else:
            text = tokenizer.encode(seg["text"])
            text_loss = seg.get("loss", True)
            ids.extend(text)
            loss.extend([text_loss] * len(text))
    ids.append(EOS_ID)
    loss.append(text_loss)
    return Encoded(np.asarray(ids, dtype=np.int64), image_pos, images, np.asarray(loss, dtype=bool))


@dataclass
class Chunk:
    """A piece of one sample placed in a row."""

    tokens: np.ndarray
    images: list[Any]
    loss: np.ndarray  # bool per token, as in Encoded


@dataclass
class _Pending:
    ref: Any
    sample: Encoded
    start: int  # first token not yet placed; never inside an image


class Packer:
    """Builds rows of at most `seq_length` tokens and `max_images` images from a sample stream.

    `draw()` returns the reference of the next sample and `load(ref)` its Encoded form; the packer's
    only state between rows is the partly placed sample, saved as (ref, start).
    """

    def __init__(self, draw: Callable[[], Any], load: Callable[[Any], Encoded], seq_length: int,
                 max_images: int, num_image_tokens: int):
        if num_image_tokens > seq_length:
            raise DataError(f"model.connector.num_image_tokens={num_image_tokens} does not fit "
                            f"data.seq_length={seq_length}; one image must fit a sequence")
        self.draw, self.load = draw, load
        self.seq_length, self.max_images, self.n = seq_length, max_images, num_image_tokens
        self.pending: Optional[_Pending] = None

    def state_dict(self) -> Optional[dict]:
        return None if self.pending is None else {"ref": self.pending.ref, "start": self.pending.start}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.pending = None if state is None else _Pending(state["ref"], self.load(state["ref"]), state["start"])

    def _cut(self, p: _Pending, free: int, image_free: int) -> int:
        """End of the longest prefix from p.start within `free` tokens and `image_free` images."""
        pos = p.sample.image_pos
        end = min(len(p.sample.tokens), p.start + free)
        first = bisect.bisect_left(pos, p.start)  # first image not yet placed
        if first + image_free < len(pos):
            end = min(end, pos[first + image_free])
        last = bisect.bisect_left(pos, end) - 1  # last image starting before end
        if last >= 0 and pos[last] + self.n > end:
            end = pos[last]  # never cut an image in half
        return end

    def next_row(self) -> list[Chunk]:
        row: list[Chunk] = []
        used = images = 0
        while used < self.seq_length:
            if self.pending is None:
                ref = self.draw()
                self.pending = _Pending(ref, self.load(ref), 0)
            p = self.pending
            tokens_left = len(p.sample.tokens) - p.start
            images_left = len(p.sample.image_pos) - bisect.bisect_left(p.sample.image_pos, p.start)
            free, image_free = self.seq_length - used, self.max_images - images
            if tokens_left <= free and images_left <= image_free:
                end = len(p.sample.tokens)
            elif row and tokens_left <= self.seq_length and images_left <= self.max_images:
                break  # fits a row of its own: do not split it
            else:
                end = self._cut(p, free, image_free)
                if end == p.start:
                    break  # the next image does not fit here; it starts the next row
            placed = [img for k, img in zip(p.sample.image_pos, p.sample.images) if p.start <= k < end]
            row.append(Chunk(p.sample.tokens[p.start:end], placed, p.sample.loss[p.start:end]))
            used += end - p.start
            images += len(placed)
            if end == len(p.sample.tokens):
                self.pending = None
            else:
                p.start = end
                break  # the rest of a long sample continues in the next row
        return row


def row_arrays(row: list[Chunk], seq_length: int, image_token_id: int) -> dict[str, np.ndarray]:
    """The contract's per-row arrays (see the module docstring) for one packed row."""
    tokens = np.full(seq_length, PAD_ID, dtype=np.int64)
    labels = np.full(seq_length, PAD_ID, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    segment_ids = np.zeros(seq_length, dtype=np.int32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    at = 0
    for seg, chunk in enumerate(row, start=1):
        t, n = chunk.tokens, len(chunk.tokens)
        tokens[at:at + n] = t
        labels[at:at + n - 1] = t[1:]
        loss_mask[at:at + n - 1] = (t[1:] != image_token_id) & chunk.loss[1:]
        segment_ids[at:at + n] = seg
        position_ids[at:at + n] = np.arange(n)
        at += n
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "segment_ids": segment_ids, "position_ids": position_ids}

