"""`mm1 benchmark`: time training steps on synthetic data at one or more parallel layouts, each
under torch.distributed.run with the process count it needs; a Markdown table and JSON."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

KEYS = {"tp", "pp", "vpp", "ep", "etp", "dp"}


def parse_layout(text: str) -> dict[str, int]:
    """`tp2pp2`, `tp2-ep2` or `tp=2,pp=2` -> {'tp': 2, 'pp': 2}."""
    pairs = re.findall(r"(vpp|etp|tp|pp|ep|dp)\s*=?\s*(\d+)", text)
    rest = re.sub(r"(vpp|etp|tp|pp|ep|dp)\s*=?\s*(\d+)|[,\s-]", "", text)
    if not pairs or rest:
        from megatron_mm1.config import ConfigError

        raise ConfigError(f"layout '{text}': use keys {', '.join(sorted(KEYS))} with sizes, e.g. tp2pp2 or tp=2,pp=2")
    return {k: int(v) for k, v in pairs}


def layout_overrides(layout: dict[str, int]) -> tuple[list[str], int]:
    """(--set overrides, process count). Sequence parallelism goes on with TP > 1; DP defaults
    to the smallest that holds the expert layout."""
    tp, pp, ep = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1)
    etp = layout.get("etp", tp)
    dp = layout.get("dp", max(1, ep * etp // tp))
    sets = [
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.sequence_parallel={str(tp > 1).lower()}",
        f"parallel.expert_model_parallel_size={ep}",
    ]
    if "vpp" in layout:
        sets.append(f"parallel.virtual_pipeline_model_parallel_size={layout['vpp']}")
    if "etp" in layout:
        sets.append(f"parallel.expert_tensor_parallel_size={etp}")
    return sets, tp * pp * dp


def _name(r: dict) -> str:
    lay = r["layout"]
    name = f"tp{lay['tp']}pp{lay['pp']}" + (f"vpp{lay['vpp']}" if lay["vpp"] else "")
    return name + (f"ep{lay['ep']}etp{lay['etp']}" if lay["ep"] > 1 else "") + f"dp{lay['dp']}"


def markdown(reports: list[dict]) -> str:
    rows = [
        "| layout | spec | ranks | step s (median, min-max) | tokens/s/GPU | images/s/GPU | TFLOP/s/GPU | MFU | peak mem GiB | vision fwd+bwd s | LLM fwd s | LLM bwd+comm s | optimizer s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        t, b = r["step_time_s"], r["breakdown_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        rows.append(
            f"| {_name(r)} | {r['config']['layer_spec']} | {r['layout']['world_size']} | {t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f}) | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['images_per_s_per_gpu']:,.1f} | {r['tflops_per_gpu']:.4g} | {mfu} | "
            f"{r['peak_memory_gib']:.2f} | {b['vision_forward'] + b['vision_backward']:.3f} | {b['llm_forward']:.3f} | "
            f"{b['llm_backward_and_comm']:.3f} | {b['optimizer']:.3f} |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.benchmark import check_mix
    from megatron_mm1.config import load_config, validate
    from megatron_mm1.launch import launch_local
    from megatron_mm1.models.te_spec import check_runs

    layouts = [parse_layout(x) for item in args.layouts for x in item.split(",") if x.strip()]
    layouts += [parse_layout(x) for x in args.layout]
    specs = [f"model.layer_spec={x.strip()}" for x in args.specs.split(",") if x.strip()] if args.specs else []
    runs = [
        ([*sets, *([spec] if spec else [])], nproc)
        for sets, nproc in [layout_overrides(lay) for lay in layouts] or [([], args.nproc)]
        for spec in specs or [None]
    ]
    for sets, nproc in runs:  # refuse any bad layout before the first process starts
        cfg = load_config(args.config, [*args.set, *sets])
        validate(cfg, world_size=nproc)
        check_runs(cfg)
        check_mix(cfg, args.images_per_seq, args.samples_per_row)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (sets, nproc) in enumerate(runs):
            out = Path(tmp) / f"{i}.json"
            worker_args = [
                "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--images-per-seq", str(args.images_per_seq), "--samples-per-row", str(args.samples_per_row),
                "--out", str(out), *[x for s in [*args.set, *sets] for x in ("--set", s)],
                *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
            ]
            print(f"benchmark {i + 1}/{len(runs)}: {nproc} processes, {' '.join(sets) or 'config layout'}", file=sys.stderr)
            code = launch_local(nproc, "megatron_mm1.benchmark", worker_args)
            if code != 0:
                print(f"mm1 benchmark: the run at {' '.join(sets)} exited with code {code}", file=sys.stderr)
                return code
            reports.append(json.loads(out.read_text()))
    if args.json:
        print(json.dumps(reports))
        return 0
    r0 = reports[0]
    mix = r0["mix"]
    print(
        f"\n{args.config} on {r0['device']}: {mix['images_per_sequence']} images per {mix['seq_length']}-token "
        f"sequence ({mix['samples_per_row']} packed samples, {mix['padding_per_row']} padding tokens), "
        f"micro-batch {mix['micro_batch_size']}, global batch {mix['global_batch_size']}; "
        f"{args.steps} timed steps after {args.warmup} warm-up; peak {r0['peak_tflops'] or 'n/a'} TFLOP/s "
        f"({r0['peak_source']}); memory: {r0['memory_kind']}\n"
    )
    print(markdown(reports))
    return 0


def add_parser(subparsers) -> None:
    from megatron_mm1.planner import GPUS

    peaks = ", ".join(sorted({f"{gpu.family} {gpu.peak_tflops:g}" for gpu in GPUS.values()}))
    p = subparsers.add_parser(
        "benchmark",
        help="time training steps on synthetic data at one or more parallel layouts",
        description="Time training steps (forward, backward, optimizer) on synthetic data of a stated "
        "mix, after warm-up, at each layout (one torchrun per layout). Reports step time, tokens/s/GPU "
        "(text + image tokens, padding excluded), images/s/GPU, TFLOP/s/GPU (whole model, "
        "megatron_mm1.flops), MFU, peak memory and a time breakdown.",
    )
    p.add_argument("--config", required=True, help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--images-per-seq", type=int, default=4, help="images in every sequence (default 4)")
    p.add_argument("--samples-per-row", type=int, default=2, help="packed samples per sequence (default 2)")
    p.add_argument("--layouts", action="append", default=[], metavar="L1,L2",
                   help="comma-separated layouts to sweep, e.g. tp1,tp2,pp2,tp2pp2,ep2 (keys tp pp vpp ep etp dp)")
    p.add_argument("--layout", action="append", default=[], metavar="KEY=V,...",
                   help="one layout, e.g. tp=2,pp=2 (repeatable)")
    p.add_argument("--specs", default=None, metavar="S1,S2",
                   help="layer specs to run at each layout, side by side, e.g. local,fast,te (te: where Transformer Engine imports; default: the config's)")
    p.add_argument("--nproc", type=int, default=1, help="processes when no layout is given (default 1)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak TFLOP/s per device for MFU (default: the GPU's bf16 dense peak, {peaks}; required on CPU)")
    p.add_argument("--json", action="store_true", help="print a JSON list of the reports")
    p.set_defaults(func=run)
