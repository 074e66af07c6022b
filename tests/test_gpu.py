"""On one CUDA GPU: the CLI end to end, as a GPU run would use it (docs/gpu.md).

World size 1 throughout (NCCL refuses two ranks on one GPU). Every case runs the real CLI in a
subprocess; process start-up dominates, so one 30-step run per (model, layer spec) serves the
loss check, the exact-resume check and the conversion, and tools/gpu_check.sh spreads the rest
over 4 pytest workers (`-n 4 --dist loadgroup` keeps the tests sharing a run on one worker).

Without CUDA every test is skipped, cheaply: nothing is generated at import. To try the
harness's commands on a CPU machine (slowly), set MM1_GPU_TESTS_ON_CPU=1; the GPU-only
assertions are then left out.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from megatron_mm1.models import te_spec

CUDA = torch.cuda.is_available()
# The layer specs that run here: `te` where Transformer Engine imports (not on the device image;
# gpu_check's report then says so beside the benchmark's figures).
SPECS = ["local", "fast"] + (["te"] if te_spec.unavailable() is None else [])
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not CUDA and not os.environ.get("MM1_GPU_TESTS_ON_CPU"),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False): "
        "run tools/gpu_check.sh on a GPU machine, see docs/gpu.md",
    ),
]

STEPS = 30
TIMEOUT = 150  # seconds per CLI run; a tiny run takes seconds after start-up
BF16 = ["training.warmup_steps=2", "training.bf16=true"]
ENV = {"PYTHONUNBUFFERED": "1"}


def mm1(*args: str, expect: int = 0, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`mm1 ARGS` in its own process group (killed whole on timeout); fails on another exit code."""
    cmd = [sys.executable, "-m", "megatron_mm1.cli", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to its workers
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} ran over {timeout}s:\n{_tail(out + err)}")
    if proc.returncode != expect:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}, expected {expect}:\n{_tail(out + err)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def train(data: Path, out: Path, steps: int, sets=(), config: str = "tiny", resume=None, expect: int = 0):
    args = ["train", "--config", config, "--data", str(data), "--out", str(out), "--steps", str(steps), "--nproc", "1"]
    args += ["--resume", resume] if resume else []
    for item in [*BF16, *sets]:
        args += ["--set", item]
    return mm1(*args, expect=expect)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(out)}


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The demo corpus: tools/gpu_check.sh makes it once for all workers (MM1_GPU_DATA)."""
    given = os.environ.get("MM1_GPU_DATA")
    if given and (Path(given) / "manifest.json").is_file():
        return Path(given)
    out = tmp_path_factory.mktemp("demo-data")
    mm1("data", "demo", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def run_30_steps(data, tmp_path_factory):
    """One 30-step bf16 run per (config, spec), deterministic (exact resume compares with it),
    shared by the tests of its xdist group."""
    done: dict[tuple[str, str], Path] = {}

    def get(config: str, spec: str) -> Path:
        if (config, spec) not in done:
            out = tmp_path_factory.mktemp(f"{config}-{spec}")
            train(data, out, STEPS, [f"model.layer_spec={spec}", "training.deterministic=true"], config)
            done[config, spec] = out
        return done[config, spec]

    return get


def group(config: str, spec: str):
    return pytest.mark.xdist_group(f"{config}-{spec}")


@pytest.mark.parametrize(
    "config, spec",
    [pytest.param(c, s, marks=group(c, s), id=f"{c}-{s}") for c in ("tiny", "tiny-moe") for s in SPECS],
)
def test_loss_falls_in_bf16(run_30_steps, config, spec):
    history = losses(run_30_steps(config, spec))
    assert list(history) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in history.values()), history
    # On CPU the tiny model goes from 6.8 to 2.4 in 30 steps (mean of 3); 30% is a clear margin.
    early, late = sum(history[s] for s in (1, 2, 3)) / 3, sum(history[s] for s in (28, 29, 30)) / 3
    assert late < 0.7 * early, (early, late, history)


@group("tiny", "local")
def test_exact_resume(data, tmp_path, run_30_steps):
    """30 steps uninterrupted against 15 + `--resume auto` + 15: the same losses, bit for bit.

    Exact equality needs reproducible kernels, which CUDA does not promise by default:
    training.deterministic pins cuBLAS's workspace and takes cuDNN's and torch's deterministic
    algorithms. Dense with the local spec also avoids the atomics that have no deterministic
    form (SDPA's memory-efficient backward, MoE's scatter_add); the connector's adaptive pooling
    adds one gradient per input element on tiny's 4x4 -> 2x2 grid. The check of the first half
    tells run-to-run nondeterminism apart from a resume bug. No tolerance: a close-but-not-equal
    resume is exactly what this test exists to catch."""
    whole = losses(run_30_steps("tiny", "local"))
    split = tmp_path / "split"
    sets = ["model.layer_spec=local", "training.deterministic=true"]
    train(data, split, STEPS, [*sets, f"training.exit_after_steps={STEPS // 2}"], expect=75)
    train(data, split, STEPS, sets, resume="auto")
    resumed = losses(split)
    assert list(resumed) == list(range(1, STEPS + 1))
    half = STEPS // 2
    differ = [s for s in range(1, half + 1) if resumed[s] != whole[s]]
    # Before the stop both runs are the same fresh run: a difference there is run-to-run
    # nondeterminism on the GPU that training.deterministic did not remove, not a resume bug.
    assert not differ, f"two fresh identical runs differ at steps {differ}: {whole} vs {resumed}"
    differ = [s for s in range(half + 1, STEPS + 1) if resumed[s] != whole[s]]
    assert not differ, f"resume is not exact: steps {differ} differ: {whole} vs {resumed}"


@pytest.mark.parametrize(
    "config, spec",
    [pytest.param(c, s, marks=group(c, s), id=f"{c}-{s}") for c in ("tiny", "tiny-moe") for s in SPECS if s != "fast"],
)
def test_convert_to_hf_verifies(tmp_path, run_30_steps, config, spec):
    """The trained (bf16) checkpoint exports to a Hugging Face folder whose logits match. The
    conversion reads a `te` checkpoint with the `local` layers (te_spec.NORM_KEYS)."""
    ckpt = run_30_steps(config, spec) / "checkpoints" / f"step_{STEPS:07d}"
    assert ckpt.is_dir()
    out = tmp_path / "hf"
    proc = mm1("convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out), "--verify", "--quiet")
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file(), proc.stdout


# The device audit's cases for real (tests/test_device_audit.py), at world size 1: a frozen
# tower is in no gradient buffer, and without the distributed optimizer no buffer holds a copy
# of the weights either, so only the model's own placement puts them on the GPU.
FROZEN = ["model.freeze_vision=true", "model.freeze_connector=true"]
REPLICATED = ["training.distributed_optimizer=false"]
AUDIT = {"frozen-towers": FROZEN, "replicated-optimizer": REPLICATED,
         "frozen-towers-replicated-optimizer": [*FROZEN, *REPLICATED]}


@pytest.mark.parametrize("case", list(AUDIT))
@pytest.mark.parametrize("config", ["tiny", "tiny-moe"])
def test_megatron_engine_steps(data, tmp_path, config, case):
    train(data, tmp_path, 2, AUDIT[case], config)
    history = losses(tmp_path)
    assert list(history) == [1, 2] and all(math.isfinite(v) for v in history.values()), history


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_engine_steps(data, tmp_path, zero):
    sets = ["training.engine=deepspeed", f"training.deepspeed_config=deepspeed_configs/{zero}.json"]
    train(data, tmp_path, 2, sets)
    history = losses(tmp_path)
    assert list(history) == [1, 2] and all(math.isfinite(v) for v in history.values()), history
    assert (tmp_path / "checkpoints" / "step_0000002" / "deepspeed").is_dir()


def test_benchmark_tiny():
    proc = mm1("benchmark", "--config", "tiny", "--specs", "fast", "--steps", "2", "--warmup", "1",
               "--set", "training.bf16=true", "--json")
    (report,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["step_time_s"]["median"] > 0 and report["tokens_per_s_per_gpu"] > 0
    assert report["peak_memory_gib"] > 0
    if CUDA:
        name = torch.cuda.get_device_name()
        assert report["device"] == name and report["memory_kind"] == "max_memory_allocated"
        if any(key in name for key in ("H100", "H200", "A100")):  # the benchmark's peak table
            assert report["mfu"] is not None and 0 < report["mfu"] < 1, report


@pytest.mark.parametrize("samples", [1, 8])
def test_segment_attention_is_as_accurate_as_the_dense_mask_in_bf16(samples):
    """The fast spec's attention by segment (varlen flash on CUDA) against SDPA with the dense
    block-diagonal mask, both in bf16, each measured against the fp32 dense result: forward and
    every input gradient within twice the dense kernel's own bf16 error."""
    import torch.nn.functional as F

    from megatron_mm1.models.attention import (
        attention_mask_from_segments,
        packed_segments,
        segment_attention,
        segment_kernel,
    )

    dev = torch.device("cuda" if CUDA else "cpu")
    tokens, heads, groups, dim = 2048, 24, 8, 128  # MM1-3B's heads
    segment_ids = (torch.arange(tokens, device=dev) // (tokens // samples))[None].int() + 1
    segment_ids[:, -100:] = 0  # trailing padding
    segments, mask = packed_segments(segment_ids), attention_mask_from_segments(segment_ids)
    torch.manual_seed(0)
    fp32 = [torch.randn(tokens, 1, n, dim, device=dev) for n in (heads, groups, groups)]  # megatron's layout
    grad = torch.randn(tokens, 1, heads * dim, device=dev)

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in fp32]
        out = fn(*inputs)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, grad.to(dtype)))]

    def dense(q, k, v):
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=~mask, enable_gqa=True)
        return out.permute(2, 0, 1, 3).flatten(2)

    reference = run(dense, torch.float32)
    errors = {
        name: [float((got - ref).norm() / ref.norm()) for got, ref in zip(run(fn, torch.bfloat16), reference)]
        for name, fn in (("dense", dense), ("segments", lambda q, k, v: segment_attention(q, k, v, segments, None)))
    }
    q = fp32[0].bfloat16()
    kernel = segment_kernel(q, fp32[1], segments, None)
    if CUDA:
        assert kernel == "varlen", "torch.nn.attention.varlen should run bf16 on CUDA"
    for what, seg, den in zip(["out", "dq", "dk", "dv"], errors["segments"], errors["dense"]):
        assert seg <= 2 * den, (what, kernel, errors)
