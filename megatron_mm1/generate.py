"""`mm1 generate` and `mm1 eval --checkpoint`: continue prompts (text with `<image>` markers, and
images) with the model of a checkpoint saved at any layout, loaded at the layout given: one
process by default, or TP, PP and EP over the processes of a run, the rest data parallel.

A prompt is encoded as training encodes an interleaved sample (bos, text pieces, 144 `<image>`
ids per image; no eos). Each data-parallel replica takes every dp-th prompt and continues up to
`batch_size` of them at once, right-padded into one micro-batch through megatron-core's pipeline
schedule (forward only); a finished prompt's place goes to the next one. Every rank of the run
steps together, on a batch of the same shape (replicas with less to do pad it), so that the
collectives of tensor, pipeline and expert parallelism always match.

There is no KV cache: every new token runs the whole sequence again, vision encoder included,
which costs (prompt + generated) tokens of forward per token. That is fine for checking a
checkpoint and for evaluation sets of short answers; for long generations, export the checkpoint
(`mm1 convert to-hf`) and use transformers' `generate()`, which caches, and which this module's
greedy output equals (tests/test_convert.py).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from megatron_mm1.config import Config, ConfigError, ParallelConfig, RunRefused, validate
from megatron_mm1.data.images import ImageRejected, load_image, preprocess
from megatron_mm1.data.packing import encode_sample
from megatron_mm1.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from megatron_mm1.device import device
from megatron_mm1.models import te_spec

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


@dataclass
class Sampling:
    """How prompts are continued: greedy at temperature 0; prompt i samples with seed + i."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1]")


def inference_config(saved: Config, layout: ParallelConfig, world_size: int) -> Config:
    """A checkpoint's config at the generation layout: fp32 (the weights of a bf16 run load
    exactly), one micro-batch a step, and the `fast` layers for a `te` checkpoint where
    Transformer Engine cannot run (the same weights: models/te_spec.py); ConfigError, before
    any process group, when the layout does not fit the model or `world_size`."""
    if layout.virtual_pipeline_model_parallel_size:
        raise ConfigError("generation runs one micro-batch at a time, which virtual pipeline stages cannot "
                          "schedule: leave parallel.virtual_pipeline_model_parallel_size unset")
    t = saved.training
    dp = world_size // (layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size)
    training = dataclasses.replace(t, bf16=False, global_batch_size=t.micro_batch_size * max(dp, 1))
    model = saved.model
    if model.layer_spec == "te" and te_spec.unavailable():
        model = dataclasses.replace(model, layer_spec="fast")
    cfg = dataclasses.replace(saved, model=model, parallel=layout, training=training)
    validate(cfg, world_size=world_size)
    return cfg


def _last_token_logits(last: torch.Tensor, logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
    """[b, vocab]: each row's logits at its last token, its vocabulary gathered from the
    tensor-parallel ranks' shards (megatron's schedule calls this on the last stage)."""
    from megatron.core import tensor_parallel

    rows = torch.arange(len(last), device=logits.device)
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits[rows, last].contiguous())


def _logits_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["segment_ids"], images=batch["images"])
    return output, partial(_last_token_logits, batch["last"])


@dataclass
class _Row:
    index: int  # the prompt's place in the list
    ids: list[int]  # prompt and generated ids so far
    images: torch.Tensor  # on the device
    generator: torch.Generator
    new: list[int] = field(default_factory=list)


@dataclass
class _Done:
    prompt_tokens: int
    new: list[int]


class Generator:
    """A checkpoint's model (a run's newest intact checkpoint, for a run folder) loaded at
    `layout` in every process of the run (one process by default), with its tokenizer.
    Starts megatron-core; collective: every rank constructs it and calls `generate` alike."""

    def __init__(self, checkpoint: str | Path, tokenizer_file: str | None = None,
                 layout: ParallelConfig | None = None, batch_size: int = 8):
        from megatron.core import parallel_state

        from megatron_mm1.checkpoint import checkpoint_folders, intact_checkpoint, load_checkpoint_config, load_model
        from megatron_mm1.models.mm1 import build_model
        from megatron_mm1.runtime import dist_env, restart

        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size} must be >= 1")
        layout, world = layout or ParallelConfig(), dist_env().world_size
        newest = load_checkpoint_config(checkpoint_folders(Path(checkpoint))[0])
        self.env = restart(inference_config(newest, layout, world))  # validates before any process group
        self.path = intact_checkpoint(Path(checkpoint), only="model/", collective=True)
        self.cfg = inference_config(load_checkpoint_config(self.path), layout, world)
        tokenizer_file = tokenizer_file or self.cfg.data.tokenizer
        if not tokenizer_file:
            raise ConfigError(f"{self.path}'s config names no tokenizer (data.tokenizer): give --tokenizer FILE")
        self.tokenizer = Tokenizer(tokenizer_file, self.cfg.model.image_token_id, self.cfg.model.llm.vocab_size)
        self.batch_size = batch_size
        self.model = build_model(self.cfg)
        load_model(self.model, self.path / "model")
        for chunk in self.model:
            chunk.eval()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if self.cfg.model.moe.capacity_factor is not None and self.env.rank == 0:
            print("note: model.moe.capacity_factor is set: tokens over an expert's capacity are dropped, as "
                  "in training, so an answer can depend on the other prompts of its batch", file=sys.stderr)

    def generate(self, prompts: list[tuple[str, list[Path]]], sampling: Sampling,
                 progress: bool = False) -> list[dict]:
        """Each prompt's continuation, on every rank: {"prompt_tokens", "tokens", "text",
        "stopped_at_eos"}. `prompts` are (text with `<image>` markers, image files), the same
        list on every rank; `progress`: a bar of generated tokens on rank 0."""
        from megatron.core import parallel_state
        from tqdm import tqdm

        sampling.check()
        mine = range(self.dp_rank, len(prompts), self.dp_size)
        # Every replica has about as much to do: the bar follows rank 0's.
        with tqdm(total=len(mine) * sampling.max_new_tokens, desc="generate", unit="token", file=sys.stderr,
                  disable=not progress or self.env.rank != 0) as bar:
            new = self._decode({i: prompts[i] for i in mine}, sampling, bar)
        shares: list = [None] * self.dp_size
        torch.distributed.all_gather_object(shares, new, group=parallel_state.get_data_parallel_group())
        results = {i: row for share in shares for i, row in share.items()}
        return [{"prompt_tokens": results[i].prompt_tokens, "tokens": results[i].new,
                 "text": self.tokenizer.decode([t for t in results[i].new if t != EOS_ID]),
                 "stopped_at_eos": results[i].new[-1] == EOS_ID} for i in range(len(prompts))]

    def _decode(self, prompts: dict[int, tuple[str, list[Path]]], sampling: Sampling, bar) -> dict[int, _Done]:
        """This replica's prompts continued, up to `batch_size` at a time (each encoded as it
        enters the batch), in step with every other rank of the run."""
        from megatron.core import parallel_state

        from megatron_mm1.checkpoint import gather_failures

        waiting, active, finished = deque(sorted(prompts)), [], {}
        while True:
            error = None
            try:
                while waiting and len(active) < self.batch_size:
                    i = waiting.popleft()
                    tokens, images = encode_prompt(*prompts[i], self.cfg, self.tokenizer)
                    active.append(_Row(i, tokens[0].tolist(), images.to(device()),
                                       torch.Generator().manual_seed(sampling.seed + i)))
            except ConfigError as e:  # a bad image
                error = e
            rows, length, failed = self._common_shape(len(active), max((len(r.ids) for r in active), default=1),
                                                      error is not None)
            if failed:  # every rank stops, with the message of the first that failed
                failures = gather_failures(error)
                raise RunRefused(failures[min(failures)].split(": ", 1)[1])
            if rows == 0:
                return finished
            logits = self._next_logits(active, rows, length)
            chosen = torch.zeros(len(active), dtype=torch.long, device=device())
            if self.is_last_stage:
                for k, row in enumerate(active):
                    chosen[k] = next_token(logits[k], sampling.temperature, sampling.top_p, row.generator)
            torch.distributed.broadcast(chosen, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
            still = []
            for row, token in zip(active, chosen.tolist()):
                row.ids.append(token)
                row.new.append(token)
                if token == EOS_ID or len(row.new) == sampling.max_new_tokens:
                    finished[row.index] = _Done(len(row.ids) - len(row.new), row.new)
                    bar.update(sampling.max_new_tokens - len(row.new))  # the budget it leaves unused
                else:
                    still.append(row)
            bar.update(len(active))
            active = still

    def _common_shape(self, rows: int, length: int, failed: bool) -> tuple[int, int, bool]:
        """The largest batch of any replica (rows, tokens), its length a multiple of TP (the
        sequence-parallel split), rows 0 once every replica is done; and whether any rank
        failed to encode a prompt."""
        shape = torch.tensor([rows, length, int(failed)], dtype=torch.long, device=device())
        torch.distributed.all_reduce(shape, op=torch.distributed.ReduceOp.MAX)
        rows, length, failed = shape.tolist()
        tp = self.cfg.parallel.tensor_model_parallel_size
        return rows, -(-length // tp) * tp, bool(failed)

    def _next_logits(self, active: list[_Row], rows: int, length: int) -> torch.Tensor | None:
        """Logits [len(active), tokenizer vocab] of each active row's next token on the last
        pipeline stage (fp32, on the host); None elsewhere. The batch is right-padded to
        [rows, length]: padding follows every real token, which the causal mask keeps unseen."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_mm1.models.mm1 import pipeline_shape

        tokens = torch.full((rows, length), PAD_ID, dtype=torch.long)
        segments = torch.zeros((rows, length), dtype=torch.int32)
        last = torch.zeros(rows, dtype=torch.long)
        for k, row in enumerate(active):
            tokens[k, : len(row.ids)] = torch.tensor(row.ids)
            segments[k, : len(row.ids)] = 1
            last[k] = len(row.ids) - 1
        v = self.cfg.model.vision
        images = [r.images for r in active] or [torch.zeros(0, 3, v.image_size, v.image_size, device=device())]
        batch = {"tokens": tokens.to(device()), "segment_ids": segments.to(device()),
                 "images": torch.cat(images), "last": last.to(device())}
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=_logits_step, data_iterator=iter([batch]), model=self.model,
                num_microbatches=1, **pipeline_shape(self.cfg, length, rows),
                forward_only=True, collect_non_loss_data=True,
            )
        if not self.is_last_stage:
            return None
        return out[0][: len(active), : self.tokenizer.vocab_size].float().cpu()


def check_layout(checkpoint: str | Path, layout: ParallelConfig, world_size: int) -> Config:
    """The config of the checkpoint `checkpoint` names (its newest, for a run) at `layout` over
    `world_size` processes; ConfigError when they do not fit, before any process starts."""
    from megatron_mm1.checkpoint import checkpoint_folders, load_checkpoint_config

    cfg = inference_config(load_checkpoint_config(checkpoint_folders(Path(checkpoint))[0]), layout, world_size)
    if not torch.cuda.is_available():
        from megatron_mm1 import cpu_compat

        cpu_compat.check_layout(cfg)  # what init_runtime would refuse in every process
    return cfg


def dry_run(checkpoint: str | Path, layout: ParallelConfig, world_size: int) -> dict:
    """What `--dry-run` prints: the layout checked for `world_size` processes."""
    from megatron_mm1.config import data_parallel_size

    cfg = check_layout(checkpoint, layout, world_size)
    return {"checkpoint": str(checkpoint), "world_size": world_size, "parallel": dataclasses.asdict(layout),
            "data_parallel_size": data_parallel_size(cfg, world_size)}


def run_elsewhere(checkpoint: str | Path, layout: ParallelConfig, nproc: int, argv: list[str]) -> int | None:
    """`--nproc N` outside torchrun or srun: check the layout against the checkpoint's model,
    then run the command `argv` (`mm1 ARGV`) in N local processes and return their exit code.
    None: run it in this process (one process, or a rank of a launched run)."""
    from megatron_mm1.launch import launch_local, under_launcher

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be >= 1")
    if under_launcher() or nproc == 1:
        return None
    check_layout(checkpoint, layout, nproc)
    return launch_local(nproc, "megatron_mm1.cli", argv)
