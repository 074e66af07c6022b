"""`mm1 generate`: continue a prompt (text with `<image>` markers, and images) with the model of
a checkpoint saved at any layout, resharded to this one process.

The prompt is encoded as training encodes an interleaved sample (bos, text pieces, 144 `<image>`
ids per image; no eos). There is no KV cache: every new token runs the whole sequence again,
which costs (prompt + generated) tokens of forward per token. That is fine for checking a
checkpoint and for evaluation sets of short answers; for long generations at scale, export the
checkpoint (`mm1 convert to-hf`) and use transformers' `generate()`, which caches, and which this
command's greedy output equals (tests/test_convert.py).
"""

from __future__ import annotations

from pathlib import Path
import torch

from megatron_mm1.config import ConfigError
from megatron_mm1.data.images import ImageRejected, load_image, preprocess
from megatron_mm1.data.packing import attention_mask_from_segments, encode_sample
from megatron_mm1.data.tokenizer import EOS_ID, Tokenizer

IMAGE_MARKER = "<image>"


def encode_prompt(prompt: str, image_files: list[Path], cfg, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [1, s] and preprocessed images [n, 3, S, S] for a prompt whose `<image>`
    markers say where the images go, in order."""
    pieces = prompt.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(image_files):
        raise ConfigError(f"the prompt has {len(pieces) - 1} {IMAGE_MARKER} marker(s) but {len(image_files)} "
                          f"--image file(s) were given: put one {IMAGE_MARKER} where each image goes")
    segments: list[dict] = []
    for i, text in enumerate(pieces):
        if i:
            segments.append({"image": i - 1})
        if text:
            segments.append({"text": text})
    encoded = encode_sample({"segments": segments}, tokenizer, cfg.model.connector.num_image_tokens)
    tokens = torch.from_numpy(encoded.tokens[:-1]).unsqueeze(0)  # no eos: the answer follows
    v = cfg.model.vision
    images = []
    for path in image_files:
        try:
            images.append(torch.from_numpy(preprocess(load_image(Path(path).read_bytes()), v.image_size, v.arch)))
        except (OSError, ImageRejected) as e:
            raise ConfigError(f"--image {path}: cannot use it ({e})") from None
    pixels = torch.stack(images) if images else torch.zeros(0, 3, v.image_size, v.image_size)
    return tokens, pixels


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise a draw from the softmax at `temperature`, restricted to
    the smallest set of most likely tokens whose probability reaches `top_p` (nucleus)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the token that crosses top_p stays in
    sorted_probs = sorted_probs * keep
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(model, tokens: torch.Tensor, images: torch.Tensor, max_new_tokens: int, vocab_size: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, on_token=None) -> list[int]:
    """The new token ids (up to `max_new_tokens`, ending at eos if the model says it) after
    `tokens` [1, s], `images` on the model's device. Only the tokenizer's `vocab_size` ids are
    candidates (the model's vocabulary may be padded beyond it). `on_token(id)` is called for each."""
    generator = torch.Generator().manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        mask = attention_mask_from_segments(torch.ones_like(tokens, dtype=torch.int32))  # one causal sample
        logits = model(tokens, mask, images=images)[0, -1, :vocab_size].float().cpu()
        token = next_token(logits, temperature, top_p, generator)
        new.append(token)
        if on_token:
            on_token(token)
        if token == EOS_ID:
            break
        tokens = torch.cat([tokens, torch.tensor([[token]], device=tokens.device)], dim=1)
    return new


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p} must be in (0, 1]")


class Generator:
    """A checkpoint's model (a run's newest intact checkpoint for a run folder) loaded in this
    process with its tokenizer; called with a prompt, it returns
    {"prompt_tokens", "tokens", "text", "stopped_at_eos"}."""

    def __init__(self, checkpoint: str | Path, tokenizer_file: str | None = None):
        from megatron_mm1.hf.megatron_io import MegatronCheckpoint
        from megatron_mm1.hf.verify import megatron_model

        ckpt = MegatronCheckpoint(checkpoint)
        self.path, self.cfg = ckpt.path, ckpt.cfg
        tokenizer_file = tokenizer_file or self.cfg.data.tokenizer
        if not tokenizer_file:
            raise ConfigError(f"{ckpt.path}'s config names no tokenizer (data.tokenizer): give --tokenizer FILE")
        self.tokenizer = Tokenizer(tokenizer_file, self.cfg.model.image_token_id, self.cfg.model.llm.vocab_size)
        self.model = megatron_model(ckpt)

    def __call__(self, prompt: str, image_files: list[Path], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, progress: bool = False) -> dict:
        from tqdm import tqdm

        from megatron_mm1.device import device

        check_sampling(max_new_tokens, temperature, top_p)
        tokens, images = encode_prompt(prompt, image_files, self.cfg, self.tokenizer)
        with tqdm(total=max_new_tokens, desc="generate", unit="token", disable=not progress) as bar:
            new = generate(self.model, tokens.to(device()), images.to(device()), max_new_tokens,
                           self.tokenizer.vocab_size, temperature, top_p, seed, on_token=lambda _: bar.update(1))
        return {"prompt_tokens": tokens.shape[1], "tokens": new,
                "text": self.tokenizer.decode([t for t in new if t != EOS_ID]),
                "stopped_at_eos": bool(new) and new[-1] == EOS_ID}
