"""`mm1 benchmark` end to end on CPU (real torchrun processes, tiny preset) at two layouts, its
report checked for consistency: tokens and images against the synthetic global batch, FLOPs
against megatron_mm1.flops, TFLOP/s and MFU against step time and peak."""

import json
import sys

import pytest
from conftest import run

from megatron_mm1 import flops
from megatron_mm1.benchmark import device_peak
from megatron_mm1.commands.benchmark import layout_overrides, markdown, parse_layout
from megatron_mm1.config import ConfigError, load_config
from megatron_mm1.synthetic import synthetic_microbatch

IMAGES = 2
PEAK = 0.05  # TFLOP/s: a CPU has no table entry, so the test states one


@pytest.fixture(scope="module")
def reports():
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "benchmark", "--config", "tiny",
                "--layouts", "tp1,pp2", "--specs", "local,fast", "--steps", "3", "--warmup", "1", "--images-per-seq", str(IMAGES),
                "--peak-tflops", str(PEAK), "--json"], timeout=400)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_report_counts_the_synthetic_batch(reports):
    cfg = load_config("tiny")
    mbs, s, n = cfg.training.micro_batch_size, cfg.data.seq_length, cfg.model.connector.num_image_tokens
    count = cfg.training.global_batch_size // mbs  # DP = 1 at both layouts
    batches = [synthetic_microbatch(cfg, i, [IMAGES] * mbs) for i in range(count)]
    for r in reports:
        assert r["layout"]["dp"] == 1 and r["mix"]["microbatches_per_rank"] == count
        # Text + image tokens, padding (the last s/8 of each row) excluded.
        assert r["tokens_per_step"] == count * mbs * (s - s // 8) == sum(flops.batch_tokens(b) for b in batches)
        assert r["images_per_step"] == count * mbs * IMAGES
        image_tokens = sum(int((b["tokens"] == cfg.model.image_token_id).sum()) for b in batches)
        assert image_tokens == r["images_per_step"] * n  # image tokens are part of the count
        assert r["flops_per_step"] == pytest.approx(sum(flops.batch_flops(cfg, b) for b in batches), rel=1e-12)


def test_report_rates_and_mfu_are_consistent(reports):
    assert [r["layout"]["world_size"] for r in reports] == [1, 1, 2, 2]
    assert [r["config"]["layer_spec"] for r in reports] == ["local", "fast"] * 2
    for r in reports:
        t, world = r["step_time_s"], r["layout"]["world_size"]
        assert len(r["step_times_s"]) == r["steps"] == 3
        assert t["min"] <= t["median"] <= t["max"]
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_step"] / t["median"] / world)
        assert r["images_per_s_per_gpu"] == pytest.approx(r["images_per_step"] / t["median"] / world)
        assert r["tflops_per_gpu"] == pytest.approx(r["flops_per_step"] / t["median"] / world / 1e12)
        assert r["peak_tflops"] == PEAK and r["peak_source"] == "--peak-tflops"
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / PEAK)
        assert r["peak_memory_gib"] > 0 and "RSS" in r["memory_kind"]
        b = r["breakdown_s"]
        assert b["vision_forward"] > 0 and b["vision_backward"] > 0 and b["llm_forward"] > 0
        assert b["optimizer"] > 0 and b["llm_backward_and_comm"] > 0
    table = markdown(reports)
    assert table.count("\n") == 5 and "| tp1pp2dp1 | fast | 2 |" in table


def test_no_mfu_on_cpu_without_a_stated_peak():
    name, peak, source = device_peak(None)
    assert (name, peak) == ("cpu", None) and "--peak-tflops" in source


def test_gpu_peaks_come_from_the_planners_table(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                       ("NVIDIA L40S", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda name=name: name)
        assert device_peak(None)[:2] == (name, peak)
    assert device_peak(123.0) == ("NVIDIA L40S", 123.0, "--peak-tflops")


def test_layout_syntax():
    assert parse_layout("tp2pp2") == parse_layout("tp=2,pp=2") == {"tp": 2, "pp": 2}
    assert parse_layout("pp2vpp2") == {"pp": 2, "vpp": 2}
    sets, nproc = layout_overrides(parse_layout("ep2etp1"))
    assert nproc == 2 and "parallel.expert_model_parallel_size=2" in sets  # DP2 holds EP2
    assert layout_overrides({"tp": 2})[0][2] == "parallel.sequence_parallel=true"
    with pytest.raises(ConfigError):
        parse_layout("tp2x")


def test_refuses_bad_layout_and_mix_before_starting():
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "benchmark", "--config", "tiny",
                "--layouts", "tp3", "--images-per-seq", "99"], check=False)
    assert proc.returncode == 2
    assert "tensor_model_parallel_size=3" in proc.stderr


def test_refuses_unknown_spec_before_starting():
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "benchmark", "--config", "tiny",
                "--specs", "local,flash"], check=False)
    assert proc.returncode == 2 and "model.layer_spec='flash' is unknown" in proc.stderr
