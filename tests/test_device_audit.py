"""The device audit (megatron_mm1/device_audit.py, MM1_DEVICE_AUDIT=1) over what users run, on
CPU: a training step of the megatron engine (dense TP2xPP2 with a background save and a resume; MoE EP2
with frozen towers and without the distributed optimizer), a step of the DeepSpeed engine
(ZeRO-2, ZeRO-3), `mm1 benchmark` and `mm1 convert to-hf --verify`. Each would fail on any
tensor on the wrong side for a CUDA/NCCL run; tests/device_audit_cases.py shows the audit
refusing each kind of mistake."""

import re
import sys

import pytest
from conftest import ROOT, run
from test_train import TP2PP2, data, train_cmd  # noqa: F401 (data is a fixture)

AUDIT = {"MM1_DEVICE_AUDIT": "1"}
REPORT = re.compile(r"device audit \(rank (\d+)\): (\d+) ops and (\d+) collectives checked, (\d+) device mismatches")
MM1 = [sys.executable, "-m", "megatron_mm1.cli"]


def audited(cmd: list[str], ranks: int, expect: int = 0) -> str:
    """Run `cmd` under the audit; every rank must report, with collectives checked and no mismatch."""
    proc = run(cmd, check=False, env=AUDIT)
    output = proc.stdout + proc.stderr
    if proc.returncode != expect:
        tail = "\n".join(output.splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}, expected {expect}:\n{tail}")
    reports = REPORT.findall(output)
    assert sorted(int(r[0]) for r in reports) == list(range(ranks)), output[-3000:]
    for rank, ops, collectives, mismatches in reports:
        assert int(ops) > 0 and int(mismatches) == 0, (rank, ops, mismatches)
        assert int(collectives) > 0 or ranks == 1, (rank, collectives)
    return output


def test_the_audit_refuses_each_kind_of_mistake():
    proc = run([sys.executable, str(ROOT / "tests" / "device_audit_cases.py")], env=AUDIT)
    assert "12 device audit cases passed" in proc.stdout


@pytest.fixture(scope="module")
def dense_checkpoint(data, tmp_path_factory):  # noqa: F811
    """Dense TP2 x PP2 with SP and the distributed optimizer: a step and a save (through the
    background writers), then a resume (weights and optimizer state loaded) and another step."""
    out = tmp_path_factory.mktemp("audit-dense")
    audited(train_cmd(data, out, 2, 4, [*TP2PP2, "training.exit_after_steps=1", "checkpoint.async_save=true"]),
            ranks=4, expect=75)
    audited(train_cmd(data, out, 2, 4, TP2PP2, resume="auto"), ranks=4)
    return out / "checkpoints" / "step_0000002"


def test_megatron_dense_tp2pp2_step_save_and_resume(dense_checkpoint):
    assert (dense_checkpoint / "optimizer").is_dir()


def test_megatron_moe_ep2_frozen_towers_without_distributed_optimizer(data, tmp_path):  # noqa: F811
    sets = ["parallel.expert_model_parallel_size=2", "training.distributed_optimizer=false",
            "model.freeze_vision=true", "model.freeze_connector=true"]
    audited(train_cmd(data, tmp_path, 1, 2, sets, config="tiny-moe"), ranks=2)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_step(data, tmp_path, zero):  # noqa: F811
    sets = ["training.engine=deepspeed", f"training.deepspeed_config=deepspeed_configs/{zero}.json"]
    audited(train_cmd(data, tmp_path, 1, 2, sets), ranks=2)


def test_benchmark_fast_spec_tp2():
    audited([*MM1, "benchmark", "--config", "tiny", "--layouts", "tp2", "--specs", "fast", "--steps", "1",
             "--warmup", "1", "--images-per-seq", "2", "--peak-tflops", "0.05"], ranks=2)


def test_convert_to_hf_verify(dense_checkpoint, tmp_path):
    output = audited([*MM1, "convert", "to-hf", "--checkpoint", str(dense_checkpoint), "--out",
                      str(tmp_path / "hf"), "--verify", "--quiet"], ranks=1)
    assert re.search(r"verify \{.*\} OK", output)
