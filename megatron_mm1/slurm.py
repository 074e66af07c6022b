"""Slurm launchers: render slurm/train.sbatch for a run, check it before submitting, submit it.

The templates under slurm/ are ordinary sbatch scripts with two marked blocks: CLUSTER SETTINGS
(#SBATCH lines and site variables) and RUN SETTINGS (what to train). Rendering changes values in
the first and rewrites the second, so a rendered script reads like the template.

`python -m megatron_mm1.slurm check --world-size N --config ... --out ...` is what the batch
script runs on every start: the same checks as `mm1 submit`, and the resolved config written to
OUT/config.yaml.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_mm1.config import Config, ConfigError, load_config, validate
from megatron_mm1.data.formats import KINDS

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "slurm"
RUN_BEGIN = "# ==== RUN SETTINGS"
RUN_END = "# ==== END OF RUN SETTINGS"


@dataclass
class Job:
    """What `mm1 submit` puts into the template."""

    config: str
    out: Path
    nodes: int
    gpus_per_node: int
    device: str = "gpu"  # gpu: --gpus-per-node; cpu: that many processes per node, no GPU request
    data: Path | None = None
    steps: int | None = None
    sets: list[str] = field(default_factory=list)
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    max_restarts: int | None = None
    rdzv_timeout: int | None = None
    job_name: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def set_sbatch(text: str, option: str, value: str | None, enabled: bool = True) -> str:
    """Set `#SBATCH --option=value` (keeping the line's comment); `enabled=False` turns it off
    (`##SBATCH`). The option must be in the template."""
    pattern = re.compile(rf"^#+SBATCH --{re.escape(option)}(=\S*)?(?P<rest>[ \t]+#.*)?$", re.M)
    if not pattern.search(text):
        raise ConfigError(f"the template has no '#SBATCH --{option}' line to set")

    def replace(m: re.Match) -> str:
        head = ("#SBATCH" if enabled else "##SBATCH") + f" --{option}" + (f"={value}" if value is not None else (m.group(1) or ""))
        rest = m.group("rest") or ""
        return head.ljust(len(m.group(0)) - len(rest)) + rest if rest else head

    return pattern.sub(replace, text, count=1)


def set_variable(text: str, name: str, value: str) -> str:
    """Set a `NAME=value   # comment` line of the cluster settings (keeping the comment)."""
    pattern = re.compile(rf"^{name}=\S*(?P<rest>[ \t]+#.*)?$", re.M)
    if not pattern.search(text):
        raise ConfigError(f"the template has no '{name}=' line to set")

    def replace(m: re.Match) -> str:
        rest = m.group("rest") or ""
        head = f"{name}={value}"
        return head.ljust(len(m.group(0)) - len(rest)) + rest if rest else head

    return pattern.sub(replace, text, count=1)


def run_settings(job: Job, max_restarts: int) -> str:
    q = shlex.quote
    sets = " ".join(q(s) for s in job.sets)
    return "\n".join([
        f"{RUN_BEGIN}: written by `mm1 submit` =====================================",
        f"CONFIG={q(job.config)}",
        f"DATA={q(str(job.data)) if job.data else ''}",
        f"OUT={q(str(job.out))}",
        f"STEPS={job.steps if job.steps is not None else ''}",
        f"SETS=({sets})",
        f"MAX_RESTARTS={max_restarts}",
    ])


def _job_name(config: str) -> str:
    stem = Path(config).stem
    return stem if stem.startswith("mm1") else f"mm1-{stem}"


def render(job: Job, template: Path = TEMPLATES / "train.sbatch") -> str:
    """The template with the job's values: a complete sbatch script."""
    text = template.read_text()
    text = set_sbatch(text, "job-name", job.job_name or _job_name(job.config))
    text = set_sbatch(text, "nodes", str(job.nodes))
    text = set_sbatch(text, "gpus-per-node", str(job.gpus_per_node), enabled=job.device == "gpu")
    text = set_sbatch(text, "ntasks-per-node", str(job.gpus_per_node))  # one process per GPU
    text = set_sbatch(text, "output", str(job.out / "logs" / "%j.out"))
    if job.time:
        text = set_sbatch(text, "time", job.time)
    for option in ("partition", "account", "qos"):
        if getattr(job, option):
            text = set_sbatch(text, option, getattr(job, option))
    text = set_variable(text, "GPUS_PER_NODE", str(job.gpus_per_node))
    text = set_variable(text, "DEVICE", job.device)
    text = set_variable(text, "REPO", shlex.quote(str(REPO)))
    text = set_variable(text, "PYTHON", shlex.quote(sys.executable))
    if job.rdzv_timeout is not None:
        text = set_variable(text, "RDZV_TIMEOUT", str(job.rdzv_timeout))
    begin, end = text.index(RUN_BEGIN), text.index(RUN_END)
    block = text[begin:end]
    restarts = job.max_restarts
    if restarts is None:
        restarts = int(re.search(r"^MAX_RESTARTS=(\d+)", block, re.M).group(1))
    return text[:begin] + run_settings(job, restarts) + "\n" + text[end:]


@dataclass
class PrepareJob:
    """What `mm1 data prepare --slurm T` puts into slurm/prepare.sbatch: T array tasks running
    `mm1 data prepare` with `arguments` (format, input, output and the settings that shape it)."""

    tasks: int
    out: Path
    arguments: dict[str, str | list[str]]  # RUN SETTINGS variable -> value (EXTRA: a list of flags)
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None

    @property
    def logs(self) -> Path:
        return self.out.with_name(self.out.name + "-logs")  # beside the prepared folder, not in it


def render_prepare(job: PrepareJob, template: Path = TEMPLATES / "prepare.sbatch") -> str:
    """slurm/prepare.sbatch with the job's values: a complete sbatch script."""
    text = template.read_text()
    text = set_sbatch(text, "array", f"0-{job.tasks - 1}")
    text = set_sbatch(text, "output", str(job.logs / "%A_%a.out"))
    for option, value in (("cpus-per-task", job.cpus_per_task), ("time", job.time), ("partition", job.partition),
                          ("account", job.account), ("qos", job.qos)):
        if value is not None:
            text = set_sbatch(text, option, str(value))
    text = set_variable(text, "REPO", shlex.quote(str(REPO)))
    text = set_variable(text, "PYTHON", shlex.quote(sys.executable))
    lines = [f"{RUN_BEGIN}: written by `mm1 data prepare --slurm` =========================="]
    for name, value in job.arguments.items():
        lines.append(f"{name}=({shlex.join(value)})" if isinstance(value, list) else f"{name}={shlex.quote(value)}")
    begin, end = text.index(RUN_BEGIN), text.index(RUN_END)
    return text[:begin] + "\n".join(lines) + "\n" + text[end:]


def overrides(data: Path | None, steps: int | None, sets: list[str]) -> list[str]:
    """--data, --steps and --set as config overrides, as `mm1 train` applies them."""
    from argparse import Namespace

    from megatron_mm1.commands.train import overrides_from_args

    return overrides_from_args(Namespace(data=str(data) if data else None, steps=steps, set=list(sets)))


def _training_folders(cfg: Config) -> list[tuple[str, str]]:
    """(config key, folder) of every prepared folder the training data names."""
    d = cfg.data
    folders = [("data.path", d.path)] if d.path else []
    folders += [(f"data.datasets[{i}].path", entry.path) for i, entry in enumerate(d.datasets)]
    return folders + [(f"data.{kind}", path) for kind in KINDS for path in getattr(d, kind)]


def check(config: str, world_size: int, data: Path | None, steps: int | None, sets: list[str]) -> Config:
    """The config validated for `world_size` processes, and its data folder and tokenizer
    present; ConfigError (a message) otherwise."""
    cfg = load_config(config, overrides(data, steps, sets))
    validate(cfg, world_size=world_size)
    if data is not None and not Path(data).is_dir():
        raise ConfigError(f"--data {data}: no such folder (a prepared data folder, `mm1 data prepare`)")
    folders = _training_folders(cfg)
    if not folders:
        raise ConfigError("no training data: give --data DIR (or set data.path, data.datasets or "
                          "data.interleaved/caption/text/chat in the config)")
    for name, folder in folders:
        if not Path(folder).is_dir():
            raise ConfigError(f"{name}={folder}: no such folder (a prepared data folder, `mm1 data prepare`)")
    if cfg.data.valid_path and not Path(cfg.data.valid_path).is_dir():
        raise ConfigError(f"data.valid_path={cfg.data.valid_path}: no such folder (a prepared data folder)")
    if not cfg.data.tokenizer or not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer}: no tokenizer file (the data folder's "
            "tokenizer.model, or --set data.tokenizer=PATH)"
        )
    return cfg


def cluster_has_gpus() -> bool | None:
    """Whether the cluster's nodes have GPUs (GRES gpu); None when sinfo cannot tell."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return "gpu" in out.stdout


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise ConfigError(f"cannot run sbatch ({e}): submit from a machine with Slurm's commands") from e
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused {script}:\n{out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_mm1.slurm check`: what the batch script runs before starting torchrun."""
    from megatron_mm1.checkpoint import save_config
    from megatron_mm1.commands.train import add_train_arguments
    from megatron_mm1.run_folder import refuse_if_locked

    ap = argparse.ArgumentParser(prog="python -m megatron_mm1.slurm")
    sub = ap.add_subparsers(dest="action", required=True)
    p = sub.add_parser("check", help="validate for the world size, check paths, write OUT/config.yaml")
    add_train_arguments(p)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--resume")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        cfg = check(args.config, args.world_size, Path(args.data) if args.data else None, args.steps, args.set)
        refuse_if_locked(out)  # before this job touches a folder another job is running in
    except ConfigError as e:
        print(f"mm1 train: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    print(f"config {args.config} valid for {args.world_size} processes; resolved config in {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
