"""The training loop, one process per device (torchrun or Slurm): data, engine steps, logging,
checkpoints, resume, signals and NaN/Inf safety. `mm1 train` starts it.

Exit codes: 0 done; EXIT_PREEMPTED (75) when SIGTERM, SIGUSR1 or SIGINT made the run save and
stop (the Slurm launcher requeues on it); EXIT_NONFINITE (3) when too many consecutive steps had
a non-finite loss or gradient (the last good state is saved); EXIT_HUNG (76) when no step
finished within training.hang_timeout_s (watchdog.py); EXIT_SAVE_FAILED (74) when a checkpoint
could not be written (a full disk); 2 for configuration errors, a run folder in use or holding
another run, and a checkpoint that cannot be resumed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_mm1 import checkpoint as ckpt
from megatron_mm1.config import Config, ConfigError, RunRefused, data_parallel_size, load_config
from megatron_mm1.device import device, to_device
from megatron_mm1.watchdog import HangWatchdog

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 74  # EX_IOERR
EXIT_RECORD = "exit.json"  # {"code", "step", "message"}, written by rank 0 as the run ends


class StopSignal:
    """Records SIGTERM, SIGUSR1 or SIGINT (Ctrl-C); the loop saves and stops at the next step
    boundary. Later signals change nothing: a save in flight finishes."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag[0])


def next_microbatches(cfg: Config, loader, count: int) -> tuple[list[dict], list[float]]:
    """The step's micro-batches on the device and what they hold (tokens, images, FLOPs,
    undecodable images; `_count`): read on TP rank 0 (`loader`), counted from the host copies
    there, moved to the device once and broadcast from there to its TP peers."""
    from megatron.core import parallel_state

    batches = counts = None
    if loader is not None:
        host = [next(loader) for _ in range(count)]
        counts = _count_local(cfg, host)
        batches = [to_device(b) for b in host]
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        batches, counts = broadcast_microbatches(
            batches,
            counts,
            src=parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
    return batches, counts


def broadcast_microbatches(batches: Optional[list[dict]], extra, src: int, group) -> tuple[list[dict], object]:
    """`src`'s device micro-batches (and a small picklable `extra`) on every rank of `group`:
    their layout as one object, their data as one flat device tensor per dtype."""
    layout = None
    if batches is not None:
        layout = [{k: None if v is None else (tuple(v.shape), v.dtype) for k, v in b.items()} for b in batches]
    box = [(layout, extra)]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    layout, extra = box[0]
    specs = [(i, key, *spec) for i, b in enumerate(layout) for key, spec in b.items() if spec is not None]
    received = [{k: None for k in b} for b in layout]
    for dtype in sorted({spec[3] for spec in specs}, key=str):
        mine = [s for s in specs if s[3] == dtype]
        if batches is not None:
            flat = torch.cat([batches[i][key].reshape(-1) for i, key, _, _ in mine])
        else:
            flat = torch.empty(sum(math.prod(shape) for _, _, shape, _ in mine), dtype=dtype, device=device())
        torch.distributed.broadcast(flat, src=src, group=group)
        for (i, key, shape, _), part in zip(mine, flat.split([math.prod(s[2]) for s in mine])):
            received[i][key] = part.view(shape)
    return (batches if batches is not None else received), extra


# The LR schedule's settings in megatron's scheduler state, and the config fields they come from.
SCHEDULE_SETTINGS = {
    "max_lr": "training.lr",
    "min_lr": "training.min_lr_ratio",
    "lr_warmup_steps": "training.warmup_steps",
    "lr_decay_steps": "training.steps",
    "lr_decay_style": "the decay style",
    "start_wd": "training.weight_decay",
    "end_wd": "training.weight_decay",
    "wd_incr_style": "the weight decay style",
    "wd_incr_steps": "training.steps",
}


class Trainer:
    """One rank's part of a run into `out`. `resume`: None (a new run), "auto" or a checkpoint
    folder; `new_schedule`: a resume may change the LR schedule's settings (training.steps, lr,
    warmup), which is otherwise refused."""

    def __init__(self, cfg: Config, out: Path, resume: str | None = None, new_schedule: bool = False):
        from megatron.core import parallel_state

        from megatron_mm1.data import build_loader
        from megatron_mm1.data.loader import ValidationData
        from megatron_mm1.engine_base import build_engine
        from megatron_mm1.runtime import init_runtime

        self.stop = StopSignal()  # first: a signal during start-up still stops the run cleanly
        self.cfg, self.out, self.resume_from, self.new_schedule = cfg, out, resume, new_schedule
        self.root = out / "checkpoints"
        self.env = init_runtime(cfg)
        self.run_lock = self._claim_run_folder()  # before the model takes any memory
        self.dp = data_parallel_size(cfg, self.env.world_size)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        t = cfg.training
        num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp)
        self.num_microbatches = num_microbatches
        self.engine = build_engine(cfg, num_microbatches)
        # Data is produced only where needed: TP rank 0 of each pipeline stage reads this DP
        # rank's share and hands it to its TP peers; only the first stage decodes images.
        self.loader = None
        self.writes_data_state = False
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            self.loader = build_loader(cfg, self.dp_rank, self.dp, images=first)
            self.writes_data_state = first
        self.validation = ValidationData(cfg, self.dp_rank, self.dp, images=first)  # read where self.loader is
        self.background_saves = ckpt.BackgroundSaves() if cfg.checkpoint.async_save else None
        self.step = 0
        self.counters = {"skipped_steps": 0, "consecutive_nonfinite": 0, "tokens": 0, "images": 0,
                         "skipped_images": 0}
        self.is_logger = self.env.rank == 0
        from megatron_mm1.benchmark import device_peak

        self.peak_tflops = device_peak(t.peak_tflops)[1]  # None on a CPU unless configured

    # -- checkpoints ----------------------------------------------------------------------

    def _claim_run_folder(self):
        """Rank 0 locks OUT and checks that a new run starts in a folder of its own; every rank
        raises its verdict."""
        from megatron_mm1.run_folder import lock_run_folder, refuse_existing_run

        lock, verdict = None, [None]
        if self.env.rank == 0:
            try:
                lock = lock_run_folder(self.out)
                refuse_existing_run(self.out, self.resume_from)
            except ConfigError as e:
                verdict = [str(e)]
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise RunRefused(verdict[0])
        return lock

    def save(self, wait: bool = True) -> Path | None:
        """Save a checkpoint of this step (collective) and return its folder; SaveFailed on every
        rank if any rank could not write its part. With checkpoint.async_save and not `wait`,
        its writing goes on in the background and None is returned (published by _publish)."""
        background = self.background_saves
        if background:
            self._publish(wait=True)  # one save in flight at a time
        tmp = ckpt.begin_save(self.root, self.step)
        error, requests = None, []
        try:
            requests = self.engine.save(tmp, background=background is not None)
            if self.writes_data_state:
                (tmp / "data" / f"dp{self.dp_rank}.json").write_text(json.dumps(self.loader.state_dict()))
            torch.save(_rng_state(), tmp / "rng" / f"rank{self.env.rank}.pt")
            if self.is_logger:
                ckpt.save_config(self.cfg, tmp / "config.yaml")
                state = {
                    "step": self.step,
                    "counters": self.counters,
                    "scheduler": self.engine.scheduler_state(),
                    "layout": self._layout(),
                }
                (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
        except ckpt.SAVE_ERRORS as e:
            error = e
        ckpt.agree_on_errors(error, self.step, tmp)
        if not background:
            return ckpt.finish_save(self.root, tmp, self.step, self.cfg.checkpoint.keep_last)
        background.start(requests, self.root, tmp, self.step, self.cfg.checkpoint.keep_last)
        return background.poll(wait=True) if wait else None

    def _publish(self, wait: bool) -> None:
        """Publish a background save once its writing has finished on every rank. Collective."""
        path = self.background_saves.poll(wait)
        if path:
            self._log_line(f"saved {path} (written in the background)")

    def _checkpoint(self) -> float:
        """The step boundary's checkpoint work: publish a background save that has finished,
        save when one is due. Returns the seconds training waited for it. Collective."""
        start = time.perf_counter()
        if self.background_saves:
            self._publish(wait=False)
        t = self.cfg.training
        if self.step % self.cfg.checkpoint.save_interval == 0 or self.step == t.steps:
            self.save(wait=self.step == t.steps)
        return time.perf_counter() - start

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {
            "world_size": self.env.world_size,
            "data_parallel_size": self.dp,
            "tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
            "expert_model_parallel_size": p.expert_model_parallel_size,
            "engine": self.cfg.training.engine,
            # The deepspeed engine checks its own optimizer layout (ZeRO stage, offload, TP, DP).
            "distributed_optimizer": self.cfg.training.engine == "megatron" and self.cfg.training.distributed_optimizer,
        }

    def resume(self, path: Path) -> None:
        state = json.loads((path / "train_state.json").read_text())
        saved = state["layout"]
        if saved["engine"] != self.cfg.training.engine:
            raise RunRefused(
                f"{path} was saved by the {saved['engine']} engine; resume it with "
                f"--set training.engine={saved['engine']}"
            )
        if saved["data_parallel_size"] != self.dp:
            raise RunRefused(
                f"{path} was saved at data-parallel size {saved['data_parallel_size']}; the data "
                f"order resumes exactly only at that size (now {self.dp}): change TP/PP/EP or the "
                "process count so that the data-parallel size matches"
            )
        same_layout = saved == self._layout()
        load_optimizer = self.cfg.checkpoint.load_optimizer
        if load_optimizer and not same_layout and saved["distributed_optimizer"]:
            changed = {k: (v, self._layout()[k]) for k, v in saved.items() if v != self._layout()[k]}
            raise RunRefused(
                f"{path} holds a distributed-optimizer state, which reshards only over data-"
                f"parallel ranks, and the layout changed (saved, now): {changed}. Resume at the "
                "saved layout, or load the weights with a fresh optimizer: "
                "--set checkpoint.load_optimizer=false"
            )
        self._check_schedule(path, state["scheduler"])
        self.engine.load(path, load_optimizer=load_optimizer)
        self.engine.load_scheduler_state(state["scheduler"], new_schedule=self.new_schedule)
        if self.loader is not None:
            self.loader.load_state_dict(json.loads((path / "data" / f"dp{self.dp_rank}.json").read_text()))
        if same_layout:  # RNG streams belong to ranks; another layout starts them afresh
            _set_rng_state(torch.load(path / "rng" / f"rank{self.env.rank}.pt", weights_only=False))
        self.step, self.counters = state["step"], {**self.counters, **state["counters"]}

    def _check_schedule(self, path: Path, saved: dict) -> None:
        """Refuse a resume that would change the LR schedule mid-run, unless asked for."""
        now = self.engine.scheduler_state()
        changed = [f"{key} ({SCHEDULE_SETTINGS[key]}) {saved[key]} -> {now[key]}"
                   for key in SCHEDULE_SETTINGS if saved[key] != now[key]]
        if changed and not self.new_schedule:
            raise RunRefused(
                f"{path} was saved under another LR schedule (saved -> now): {'; '.join(changed)}. "
                "The schedule is part of the run: resume with the run's settings (e.g. the same "
                "--steps), or pass --new-schedule to continue under the new one"
            )

    def _verified(self, path: Path) -> Path:
        """`path` when every file matches its manifest; ConfigError naming what differs."""
        if not path.is_dir():
            raise RunRefused(f"no checkpoint at {path}")
        problems = ckpt.verify_collective(path)
        if problems:
            raise RunRefused(f"{path} is damaged: {_listed(problems)}. Resume from another checkpoint")
        return path

    def _newest_intact(self) -> Path | None:
        """`--resume auto`: the newest checkpoint of this run whose files all match their
        manifest. A damaged one is set aside (renamed damaged-step_*, kept for inspection) and
        the one before it tried; ConfigError when checkpoints exist but none is intact."""
        candidates = ckpt.resume_candidates(self.root)
        for path in candidates:
            problems = ckpt.verify_collective(path)
            if not problems:
                return path
            moved = [None]
            if self.is_logger:
                moved = [ckpt.set_aside(path)]
            torch.distributed.broadcast_object_list(moved, src=0)
            if self.is_logger:
                print(f"mm1 train: checkpoint {path} is damaged: {_listed(problems)}. Moved it to "
                      f"{moved[0]}; trying the one before it", file=sys.stderr, flush=True)
        if candidates:
            raise RunRefused(
                f"no intact checkpoint in {self.root} (each damaged one was renamed {ckpt.DAMAGED_PREFIX}*): "
                "start over with a new --out, or resume from a checkpoint elsewhere"
            )
        return None

    def _load_start_point(self) -> None:
        """Resume (--resume), or load the weights to fine-tune from, or start afresh."""
        path = None
        if self.resume_from:
            path = self._newest_intact() if self.resume_from == "auto" else self._verified(Path(self.resume_from))
            if path is not None:
                self.resume(path)
                self._log_line(f"resumed from {path} at step {self.step}")
        if path is None and self.cfg.checkpoint.finetune_from:
            source = self._verified(Path(self.cfg.checkpoint.finetune_from))
            self.engine.load(source, load_optimizer=False)
            self._log_line(f"fine-tuning from the weights of {source}")

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        from tqdm import tqdm

        if self.is_logger:
            ckpt.remove_incomplete(self.root)
            (self.out / EXIT_RECORD).unlink(missing_ok=True)
        torch.distributed.barrier()
        try:
            self._load_start_point()
        except ConfigError as e:  # the record keeps the Slurm template from requeueing it
            if self.is_logger:
                self._write_exit_record(2, str(e))
            raise
        first_step = self.step
        logger = MetricsLogger(self.out, self.cfg, self.step) if self.is_logger else None
        loader = iter(self.loader) if self.loader is not None else None
        t = self.cfg.training
        # A live bar on a terminal; in batch logs (Slurm) one plain line per logged step.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=t.steps, initial=self.step, desc="train", disable=not (self.is_logger and interactive),
                   dynamic_ncols=True)
        watchdog = HangWatchdog(t.hang_timeout_s, self.out, self.env.rank,
                                self.out / EXIT_RECORD if self.is_logger else None)
        try:
            return self._loop(loader, logger, bar, watchdog, first_step, interactive)
        except ckpt.SaveFailed as e:
            return self._exit(EXIT_SAVE_FAILED, f"stopping: {e}")
        finally:
            watchdog.stop()
            bar.close()
            if logger:
                logger.close()

    def _loop(self, loader, logger, bar, watchdog: HangWatchdog, first_step: int, interactive: bool) -> int:
        t = self.cfg.training
        if self.step == 0 and self.validation:  # the starting point's loss, to compare against
            row = {"step": 0, **self._validate()}
            watchdog.beat(0)
            if logger:
                logger.log(row)
        while self.step < t.steps:
            start = time.perf_counter()
            batches, counts = next_microbatches(self.cfg, loader, self.num_microbatches)
            metrics = self.engine.train_step(batches)
            self.step += 1
            watchdog.beat(self.step)
            row = self._record(metrics, counts, time.perf_counter() - start)
            if self.validation and (self.step % t.eval_interval == 0 or self.step == t.steps):
                row.update(self._validate())
                watchdog.beat(self.step)
            stop = self._stop_reason(first_step)
            if stop is None:
                row["checkpoint_s"] = self._checkpoint()
            bar.update(1)
            if logger:
                logger.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                if not interactive and self.step % t.log_interval == 0:
                    print(
                        f"step {self.step}/{t.steps} loss {row['loss']:.4f} lr {row['lr']:.3e} "
                        f"grad_norm {row['grad_norm']:.3f} tokens/s {row['tokens_per_s']:.0f} "
                        f"TFLOP/s/GPU {row['tflops_per_gpu']:.3f}",
                        flush=True,
                    )
            if stop is not None:
                code, why = stop
                return self._exit(code, why(self.save()))
        return self._exit(0, f"done: {self.step} steps; checkpoints in {self.root}; metrics in {self.out / 'metrics.jsonl'}")

    def _validate(self) -> dict:
        """valid_loss_<kind> over the kind's eval_iters global batches, for each kind with
        validation data, and valid_loss: their mean weighted by the training mixture's kind
        weights. The batches are read where the training batches are. Collective."""
        start = time.perf_counter()
        row = {}
        for kind in self.validation.kinds:
            batches = self.validation.batches(kind) if self.loader is not None else None
            losses = [self.engine.evaluate(next_microbatches(self.cfg, batches, self.num_microbatches)[0])
                      for _ in range(self.cfg.training.eval_iters)]
            row[f"valid_loss_{kind}"] = sum(losses) / len(losses)
        weights = self.validation.weights
        row["valid_loss"] = sum(w * row[f"valid_loss_{k}"] for k, w in weights.items()) / sum(weights.values())
        row["valid_s"] = time.perf_counter() - start
        per_kind = ", ".join(f"{k} {row[f'valid_loss_{k}']:.4f}" for k in self.validation.kinds)
        self._log_line(f"step {self.step} valid_loss {row['valid_loss']:.4f} ({per_kind})")
        return row

    def _stop_reason(self, first_step: int):
        """(exit code, message for the saved checkpoint) when the run stops at this step, else
        None. Collective (the signal check)."""
        t = self.cfg.training
        if self.counters["consecutive_nonfinite"] >= t.max_nonfinite_steps:
            # The weights saved are the last good ones: bad steps were skipped.
            return EXIT_NONFINITE, lambda path: (
                f"stopping: {self.counters['consecutive_nonfinite']} consecutive steps had a "
                f"NaN/Inf loss or gradient (training.max_nonfinite_steps={t.max_nonfinite_steps}); "
                f"the last good state is in {path}. Lower training.lr, check the data, or "
                "resume from an earlier checkpoint"
            )
        if self.stop.any_rank():
            return EXIT_PREEMPTED, lambda path: (
                f"signal received: saved {path} at step {self.step}; exiting with "
                f"{EXIT_PREEMPTED} so that the launcher requeues the job"
            )
        if t.exit_after_steps and self.step - first_step >= t.exit_after_steps and self.step < t.steps:
            return EXIT_PREEMPTED, lambda path: (
                f"training.exit_after_steps={t.exit_after_steps} reached: saved {path} at "
                f"step {self.step}; resume with --resume auto"
            )
        return None

    def _exit(self, code: int, message: str) -> int:
        """Say why the run ends, in the log and in out/exit.json (launchers read it: torchrun
        reports any worker's non-zero exit as 1)."""
        if self.is_logger:
            print(message, flush=True)
            self._write_exit_record(code, message)
        # No rank ends before the record exists: under srun --kill-on-bad-exit the first rank to
        # exit with 75 ends the others.
        torch.distributed.barrier()
        return code

    def _write_exit_record(self, code: int, message: str) -> None:
        record = {"code": code, "step": self.step, "message": message}
        (self.out / EXIT_RECORD).write_text(json.dumps(record) + "\n")

    def _record(self, metrics: dict, counts: list[float], seconds: float) -> dict:
        """Update counters and build the step's metrics row (the same on every rank, except
        skipped_images: images are decoded on the first pipeline stage, which holds rank 0)."""
        tokens, images, flops, skipped_images = _count(counts)
        tflops_per_gpu = flops / self.env.world_size / seconds / 1e12
        if metrics.pop("skipped"):
            self.counters["skipped_steps"] += 1
            self.counters["consecutive_nonfinite"] += 1
        else:
            self.counters["consecutive_nonfinite"] = 0
        self.counters["tokens"] += tokens
        self.counters["images"] += images
        self.counters["skipped_images"] += skipped_images
        return {
            "step": self.step,
            **metrics,
            "tokens": tokens,
            "images": images,
            "tokens_per_s": tokens / seconds,
            "tflops_per_gpu": tflops_per_gpu,
            "mfu": tflops_per_gpu / self.peak_tflops if self.peak_tflops else None,
            "step_time_s": seconds,
            "skipped_steps": self.counters["skipped_steps"],
            "skipped_images": self.counters["skipped_images"],
        }

    def _log_line(self, text: str) -> None:
        if self.is_logger:
            print(text, flush=True)


def _listed(problems: list[str], most: int = 3) -> str:
    more = f" and {len(problems) - most} more" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def _count_local(cfg: Config, batches: list[dict]) -> list[float]:
    """This rank's micro-batches' tokens (padding excluded), images, training FLOPs and images
    that could not be decoded, read from their host copies."""
    from megatron_mm1.flops import batch_flops, batch_tokens

    return [
        sum(batch_tokens(b) for b in batches),
        sum(int(b["num_images"].sum()) for b in batches),
        sum(batch_flops(cfg, b) for b in batches),
        sum(int(b["skipped_images"]) for b in batches),
    ]


def _count(counts: list[float]) -> tuple[int, int, float, int]:
    """`_count_local`'s figures summed over all DP ranks."""
    from megatron.core import parallel_state

    total = torch.tensor(counts, dtype=torch.float64, device=device())
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    tokens, images, flops, skipped_images = total.tolist()
    return int(tokens), int(images), flops, int(skipped_images)


class MetricsLogger:
    """metrics.jsonl rows and the same scalars as tensorboard events under out/tensorboard
    (train/<key>, and valid/<key> for valid_<key>). A run resumed at `step` drops the rows
    logged after it (they are trained again), so that each step has one row; a run starting at
    step 0 drops them all (its step-0 validation is redone)."""

    def __init__(self, out: Path, cfg: Config, step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        path = out / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if step and json.loads(line)["step"] <= step]
            (out / "metrics.jsonl.tmp").write_text("".join(kept))
            os.replace(out / "metrics.jsonl.tmp", path)
        self.file = open(path, "a")
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else 0)
        self.interval = cfg.training.log_interval

    def log(self, row: dict) -> None:
        """Write a row at every log_interval steps, and every row with a validation loss."""
        if row["step"] % self.interval and "valid_loss" not in row:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = f"valid/{key.removeprefix('valid_')}" if key.startswith("valid_") else f"train/{key}"
                self.writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        self.file.close()
        self.writer.close()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def main(argv: list[str] | None = None) -> int:
    """Worker entry point (one per process): python -m megatron_mm1.train --config ... --out ..."""
    from megatron_mm1.runtime import (EXIT_RENDEZVOUS_TIMEOUT, RendezvousTimeout, dist_env,
                                      quiet_third_party_warnings, shutdown)

    quiet_third_party_warnings()
    ap = argparse.ArgumentParser(description="training worker (run under torchrun; see `mm1 train`)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume")
    ap.add_argument("--new-schedule", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        code = Trainer(load_config(args.config, args.set), args.out, args.resume, args.new_schedule).run()
    except ConfigError as e:
        if not isinstance(e, RunRefused) or dist_env().rank == 0:
            print(f"mm1 train: {e}", file=sys.stderr)
        return 2
    except RendezvousTimeout as e:
        print(f"mm1 train: {e}", file=sys.stderr)
        return EXIT_RENDEZVOUS_TIMEOUT
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
