"""Helpers of tools/gpu_check.sh (docs/gpu.md), run with the GPU machine's python3:

  preflight --wheels .whl --out F   versions, the device, imports, carried wheels' requirements
  plan --logs DIR --gpu-type T ...  `mm1 plan --json` of the benchmark's proxy, once per spec
  assemble --logs DIR --out F ...   gpu-report.json from the parts' outputs, and a short table

Standard library only (plus packaging and torch in preflight), so that a broken install still
gets a report. Every reader tolerates a missing or malformed part: the report says what is
missing instead of failing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ("local", "fast", "te")
# gpu_check.sh's benchmark runs (bench-NAME.log): the MM1-3B proxy per spec, the MoE proxy's.
BENCH_RUNS = (*SPECS, "moe-fast", "moe-te")
PACKAGES = ["torch", "megatron-core", "deepspeed", "transformers", "pydantic", "typing-extensions",
            "packaging", "numpy", "sentencepiece", "safetensors", "tensorboard", "einops", "pytest", "pytest-xdist"]
# What gpu_check.sh imports before the tests, to tell a broken install from a failing test.
IMPORTS = ["megatron.core", "deepspeed", "transformers", "megatron_mm1.cli", "megatron_mm1.train",
           "megatron_mm1.ds_engine", "megatron_mm1.benchmark", "megatron_mm1.hf.verify"]


# ----------------------------------------------------------------------------- preflight


def _version(name: str):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _requirements(wheels: Path) -> list[str]:
    """Unmet requirements of the carried wheels against what is importable here."""
    from packaging.requirements import Requirement

    problems = []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(req.name)
            if have is None:
                problems.append(f"{whl.name}: {req} is not installed")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{whl.name}: {req}, found {have}")
    return problems


def preflight(args) -> int:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    ok = True
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device"] = {
                "name": props.name, "count": torch.cuda.device_count(),
                "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 2),
                "multiprocessors": props.multi_processor_count,
            }
            info["cudnn"] = torch.backends.cudnn.version()
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        else:
            ok = False
    except Exception:
        info["torch_error"] = traceback.format_exc(limit=2)
        ok = False
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip() or None
    except Exception:
        info["driver"] = None
    info["packages"] = {name: _version(name) for name in PACKAGES}
    info["imports"] = {}
    for module in IMPORTS:
        start = time.perf_counter()
        try:
            __import__(module)
            info["imports"][module] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
        except Exception as e:
            info["imports"][module] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            ok = False
    try:  # DeepSpeed decides at run time; the wheel was built on a machine without CUDA
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_accelerator"] = get_accelerator().device_name()
    except Exception as e:
        info["deepspeed_accelerator"] = f"{type(e).__name__}: {e}"[:300]
    try:
        info["unmet_requirements"] = _requirements(Path(args.wheels))
        ok = ok and not info["unmet_requirements"]
    except Exception as e:
        info["unmet_requirements"] = [f"could not check: {type(e).__name__}: {e}"]
        ok = False
    info["ok"] = ok
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    dev = info.get("device") or {}
    print(f"python {info['python']}, torch {info.get('torch')}, CUDA {info.get('cuda')}, driver {info.get('driver')}, "
          f"device {dev.get('name', 'none')} ({dev.get('memory_gib', '?')} GiB, sm {dev.get('capability', '?')})")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    print(f"deepspeed accelerator: {info['deepspeed_accelerator']}")
    for module, result in info["imports"].items():
        print(f"import {module}: " + (f"{result['seconds']} s" if result["ok"] else f"FAILED {result['error']}"))
    for problem in info["unmet_requirements"]:
        print(f"unmet: {problem}")
    for key in ("torch_error",):
        if key in info:
            print(info[key])
    if not info.get("cuda_available"):
        print("no CUDA device visible to torch")
    print(f"preflight: {'ok' if ok else 'FAILED'} ({args.out})")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- plan


def plan(args) -> int:
    """`mm1 plan --json` for the benchmark's settings, once per layer spec; exit 0 if both parsed
    (the planner's own exit code is 1 when no layout fits, which is still an answer)."""
    ok = True
    for spec in SPECS:
        cmd = [sys.executable, "-m", "megatron_mm1.cli", "plan", "--config", args.config, "--gpus", "1",
               "--gpu-type", args.gpu_type, "--images-per-seq", str(args.images_per_seq), "--json",
               *[x for s in [*args.set, f"model.layer_spec={spec}"] for x in ("--set", s)]]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        sys.stderr.write(proc.stderr)
        out = Path(args.logs) / f"plan-{spec}.json"
        try:
            json.loads(proc.stdout)
            out.write_text(proc.stdout)
            print(f"plan ({spec}): exit {proc.returncode}, {out}")
        except ValueError:
            print(f"plan ({spec}): exit {proc.returncode}, no JSON:\n{proc.stdout[-2000:]}")
            ok = False
    return 0 if ok else 1


# ----------------------------------------------------------------------------- assemble


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_json_line(path: Path):
    """`mm1 benchmark --json` prints its list last; workers' output may come before it."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("["):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def parts(logs: Path) -> list[dict]:
    """parts.tsv: one line per part from gpu_check.sh: name, status, rc, seconds, limit."""
    rows = []
    try:
        lines = (logs / "parts.tsv").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        name, status, rc, seconds, limit = (line.split("\t") + [""] * 5)[:5]
        rows.append({"name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                     "seconds": float(seconds) if seconds else None, "limit_s": int(limit) if limit.isdigit() else None,
                     "log": f"{name}.log"})
    return rows


def pytest_summary(logs: Path) -> dict:
    """From the junit XML; from the log's last summary line when there is none."""
    try:
        root = ET.parse(logs / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        root = None
    if root is None:
        try:
            text = (logs / "pytest.log").read_text(errors="replace")
        except OSError:
            return {"source": "none: no pytest.xml or pytest.log"}
        counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
        summaries = re.findall(r"^=+ (.*\d+ (?:passed|failed|skipped|error).*) =+$", text, re.M)
        if summaries:
            for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summaries[-1]):
                counts["errors" if word.startswith("error") else word] = int(n)
        failing = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
        return {"source": "pytest.log", **counts, "failing": [{"name": n} for n in failing]}
    tests, failing = [], []
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    counted = {"passed": "passed", "failure": "failed", "error": "errors", "skipped": "skipped"}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or child.text or "")[:1500]
                break
        counts[counted[outcome]] += 1
        tests.append({"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0),
                      **({"message": message} if message else {})})
        if outcome in ("failure", "error"):
            failing.append({"name": name, "message": message})
    return {"source": "pytest.xml", **counts, "total": len(tests), "failing": failing, "tests": tests}


FIGURES = ["device", "step_time_s", "tokens_per_s_per_gpu", "images_per_s_per_gpu", "tflops_per_gpu", "mfu",
           "peak_tflops", "peak_source", "peak_memory_gib", "memory_kind", "breakdown_s", "mix", "layout", "config"]


def benchmark(logs: Path) -> dict:
    out = {}
    for name in BENCH_RUNS:
        log = logs / f"bench-{name}.log"
        reports = _last_json_line(log)
        if not reports:
            last = log.read_text().strip().splitlines()[-1:] if log.is_file() else ["no log"]
            out[name] = {"status": f"no JSON report in bench-{name}.log ({last[0][:200] if last else 'empty'})"}
            continue
        out[name] = {k: reports[0].get(k) for k in FIGURES}
    return out


def _preset_memory(result: dict):
    """The config's own layout from `mm1 plan --json`: `preset_layout` where the planner gives
    it, else the single-GPU candidate with the config's micro-batch and no recomputation."""
    if isinstance(result.get("preset_layout"), dict):
        return result["preset_layout"], "preset_layout"
    for entry in [*result.get("fits", []), *result.get("rejected", [])]:
        lay = entry.get("layout", {})
        if (lay.get("tp"), lay.get("pp"), lay.get("vpp"), lay.get("ep"), lay.get("micro_batch"), lay.get("recompute")) \
                == (1, 1, None, 1, 1, "none") and "memory_gib" in entry:
            return entry, "no preset_layout in the output: the tp1pp1 mbs1 candidate (fits/rejected)"
    return None, f"no preset_layout in the output (keys: {', '.join(sorted(result))}) and no tp1pp1 mbs1 candidate"


def planner(logs: Path, bench: dict) -> dict:
    out = {}
    for spec in SPECS:
        result = _load_json(logs / f"plan-{spec}.json")
        if not isinstance(result, dict):
            out[spec] = {"status": f"no JSON in plan-{spec}.json"}
            continue
        entry, source = _preset_memory(result)
        row = {"source": source, "images_per_sequence": result.get("images_per_sequence"), "gpu": result.get("gpu")}
        if entry is None:
            out[spec] = {**row, "status": source}
            continue
        mem = entry.get("memory_gib") or {}
        parts_ = ("weights", "gradients", "optimizer", "activations")
        # The reserve (CUDA context, NCCL, fragmentation) is not in max_memory_allocated.
        if all(isinstance(mem.get(k), (int, float)) for k in parts_):
            estimate = sum(mem[k] for k in parts_)
        elif isinstance(mem.get("total"), (int, float)):
            estimate = mem["total"] - (mem.get("reserved") or 0)
        else:
            estimate = None
        measured = (bench.get(spec) or {}).get("peak_memory_gib")
        row.update({
            "fits": entry.get("fits", entry in result.get("fits", [])),
            "estimate_gib": mem,
            "estimate_without_reserved_gib": round(estimate, 3) if estimate is not None else None,
            "measured_peak_gib": measured,
            "measured_kind": (bench.get(spec) or {}).get("memory_kind"),
        })
        if estimate and isinstance(measured, (int, float)):
            row["ratio_measured_to_estimate"] = round(measured / estimate, 4)
            row["difference_gib"] = round(measured - estimate, 3)
        else:
            row["ratio_measured_to_estimate"] = None
        out[spec] = row
    return out


def _fmt(value, pattern="{:.3f}", none="n/a"):
    return none if value is None else pattern.format(value)


def table(report: dict) -> str:
    pre = report.get("preflight") or {}
    dev = (pre.get("device") or {}).get("name", "?")
    lines = [f"gpu-check on {dev} (torch {pre.get('torch')}, CUDA {pre.get('cuda')}, driver {pre.get('driver')}), "
             f"commit {report['commit']}, {report['date']}", "",
             "| part | status | seconds | limit s |", "|---|---|---|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {_fmt(p['seconds'], '{:.0f}')} | {_fmt(p['limit_s'], '{}')} |")
    t = report["pytest"]
    lines += ["", f"pytest: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
              f"{t.get('skipped', 0)} skipped ({t.get('source')})"]
    lines += [f"  FAILED {f['name']}: {(f.get('message') or '').splitlines()[0][:200] if f.get('message') else ''}"
              for f in t.get("failing", [])]
    lines += ["", "| proxy, spec | step s (median) | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB "
              "| planner GiB (no reserve) | measured / planned | note |", "|---|---|---|---|---|---|---|---|---|"]
    for spec in BENCH_RUNS:
        b, p = report["benchmark"]["specs"].get(spec) or {}, report["planner"].get(spec) or {}
        step = (b.get("step_time_s") or {}).get("median")
        mfu = b.get("mfu")
        note = "; ".join(x["status"] for x in (b, p) if "status" in x)
        lines.append(
            f"| {'MoE, ' + spec[4:] if spec.startswith('moe-') else 'MM1-3B, ' + spec} | {_fmt(step)} | {_fmt(b.get('tokens_per_s_per_gpu'), '{:,.0f}')} | "
            f"{_fmt(b.get('tflops_per_gpu'), '{:.4g}')} | {_fmt(None if mfu is None else 100 * mfu, '{:.1f}%')} | "
            f"{_fmt(b.get('peak_memory_gib'), '{:.2f}')} | {_fmt(p.get('estimate_without_reserved_gib'), '{:.2f}')} | "
            f"{_fmt(p.get('ratio_measured_to_estimate'), '{:.3f}')} | {note} |"
        )
    failed = ", ".join(report["failed_parts"]) or "no part recorded (parts.tsv)"
    lines += ["", f"result: {'all parts passed' if report['ok'] else 'FAILED: ' + failed}"]
    return "\n".join(lines)


def assemble(args) -> int:
    logs = Path(args.logs)
    rows = parts(logs)
    bench = benchmark(logs)
    report = {
        "date": args.date,
        "commit": args.commit,
        "command": args.command,
        "budget_s": args.budget,
        "preflight": _load_json(logs / "preflight.json"),
        "parts": rows,
        "failed_parts": [p["name"] for p in rows if p["status"] != "passed"],
        "pytest": pytest_summary(logs),
        "benchmark": {"command": args.bench_command, "specs": bench},
        "planner": planner(logs, bench),
    }
    # On the GPU machine no test may be skipped: a skip there means CUDA was not seen.
    t = report["pytest"]
    if t.get("skipped") or not t.get("passed"):
        report["failed_parts"].append("pytest: tests skipped or none passed")
    report["ok"] = bool(rows) and not report["failed_parts"]
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--wheels", default=".whl")
    p.add_argument("--out", required=True)
    p.set_defaults(func=preflight)
    p = sub.add_parser("plan")
    p.add_argument("--logs", required=True)
    p.add_argument("--config", default="mm1-3b")
    p.add_argument("--gpu-type", default="h200-141gb")
    p.add_argument("--images-per-seq", type=int, default=16)
    p.add_argument("--set", action="append", default=[])
    p.set_defaults(func=plan)
    p = sub.add_parser("assemble")
    p.add_argument("--logs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--date", default=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    p.add_argument("--command", default="tools/gpu_check.sh")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--bench-command", default=None)
    p.set_defaults(func=assemble)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
