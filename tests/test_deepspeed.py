"""`mm1 train` with training.engine=deepspeed, end to end with real processes on the demo corpus:
the same losses as the megatron engine at ZeRO 1, 2, 3 (TP x DP too) and with CPU optimizer
offload, exact resume, weights that load at another layout, NaN/Inf skipping and refusals.

The first DeepSpeed run on a machine JIT-builds its shared-memory comm op (~30 s) and the
offload run DeepSpeedCPUAdam (~50 s); both are cached under ~/.cache/torch_extensions."""

import json
import sys

import pytest
from conftest import run
from test_train import data, losses, rows, train, valid_losses  # noqa: F401 (data is a fixture)

from megatron_mm1.config import ConfigError, load_config
from megatron_mm1.ds_engine import read_deepspeed_config

STEPS = 4
TP2 = ["parallel.tensor_model_parallel_size=2"]
# Validation on 10% held out, before step 1 and after steps 2 and 4.
VALID = ["data.valid_fraction=0.1", "training.eval_interval=2", "training.eval_iters=1"]


def zero(name: str) -> list[str]:
    return ["training.engine=deepspeed", f"training.deepspeed_config=deepspeed_configs/{name}.json"]


def assert_close(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=0), (step, a, b)


def assert_same_validation(a, b) -> None:
    assert list(valid_losses(a)) == list(valid_losses(b)) == [0, 2, 4]
    for step, row in valid_losses(a).items():
        assert row == pytest.approx(valid_losses(b)[step], rel=1e-5, abs=0), step


@pytest.fixture(scope="module")
def megatron_run(data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("megatron")
    train(data, out, STEPS, 2, VALID)
    return out


# ZeRO-2 is compared in the resume test, ZeRO-3 without offload at TP2 x DP2 below.
@pytest.mark.parametrize("name", ["zero1", "zero3-offload"])
def test_zero_matches_megatron(data, tmp_path, megatron_run, name):  # noqa: F811
    train(data, tmp_path, STEPS, 2, [*zero(name), *VALID])
    reference = losses(megatron_run)
    assert_close(losses(tmp_path), reference, range(1, STEPS + 1))
    assert_same_validation(tmp_path, megatron_run)
    assert reference[STEPS] < reference[1]
    row = rows(tmp_path)[-1]
    assert row["grad_norm"] == pytest.approx(rows(megatron_run)[-1]["grad_norm"], rel=1e-4)
    assert row["lr"] == pytest.approx(rows(megatron_run)[-1]["lr"], rel=1e-12)


def test_zero2_exact_resume_matches_megatron(data, tmp_path, megatron_run):  # noqa: F811
    train(data, tmp_path / "whole", STEPS, 2, [*zero("zero2"), *VALID])
    assert_close(losses(tmp_path / "whole"), losses(megatron_run), range(1, STEPS + 1))
    assert_same_validation(tmp_path / "whole", megatron_run)
    split = tmp_path / "split"
    train(data, split, STEPS, 2, [*zero("zero2"), *VALID, "training.exit_after_steps=2"], expect=75)
    assert list(losses(split)) == [1, 2]
    ckpt = split / "checkpoints" / "step_0000002"
    assert (ckpt / "deepspeed" / "latest").is_file() and (ckpt / "model" / "metadata.json").is_file()
    train(data, split, STEPS, 2, [*zero("zero2"), *VALID], resume="auto")
    assert losses(split) == losses(tmp_path / "whole")  # bit-identical, not merely close
    assert valid_losses(split) == valid_losses(tmp_path / "whole")
    # ZeRO-2's optimizer partitions do not load under ZeRO-1: a clear refusal.
    proc = mm1_train(data, tmp_path / "other", [*zero("zero1"), *VALID, f"training.steps={STEPS}",
                                                "training.warmup_steps=2"],
                     resume=str(ckpt))  # the run's schedule: the ZeRO stage is what differs
    assert proc.returncode != 0 and "checkpoint.load_optimizer=false" in proc.stderr, proc.stderr[-2000:]
    assert "'zero_stage': 2" in proc.stderr


def test_zero3_tp2_weights_load_at_another_layout(data, tmp_path):  # noqa: F811
    # ZeRO-3 partitions the weights over DP; path/model must still hold them whole. Weights are
    # initialised on the device per TP shard, so the megatron reference runs at TP2 too.
    train(data, tmp_path / "a", STEPS, 4, [*TP2, *zero("zero3"), "checkpoint.save_interval=2"])
    train(data, tmp_path / "megatron", STEPS, 4, TP2)
    a = losses(tmp_path / "a")
    assert_close(a, losses(tmp_path / "megatron"), range(1, STEPS + 1))
    # TP2 x ZeRO-3 -> TP1 x ZeRO-1, weights only: step 3's loss comes from step 2's weights.
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000002"
    # Each DP rank wrote its share of path/model (ranks 0, 1: DP rank 0; 2, 3: DP rank 1), from
    # parameters gathered one at a time: no rank gathered the whole model.
    assert {int(f.name.split("_")[2]) for f in (ckpt / "model").glob("__*_*.distcp")} == {0, 1, 2, 3}
    train(data, tmp_path / "b", 3, 2, [*zero("zero1"), "checkpoint.load_optimizer=false"], resume=str(ckpt),
          args=["--new-schedule"])  # 3 steps, not the run's 4: step 3's loss does not depend on it
    b = losses(tmp_path / "b")
    assert list(b) == [3]
    assert_close(b, a, [3])


def test_nonfinite_steps_are_skipped(data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(data, out, 20, 1, [*zero("zero2"), "training.lr=1e5", "training.max_nonfinite_steps=2"], expect=3)
    history = rows(out)
    assert history[-1]["skipped_steps"] == 2 and history[-1]["step"] < 20
    assert all(r["lr"] == history[-3]["lr"] for r in history[-2:])  # the schedule did not advance


# -- refusals ------------------------------------------------------------------------------


def mm1_train(data, out, sets, nproc=2, config="tiny", resume=None):  # noqa: F811
    """`mm1 train` expected to fail at start-up (one step otherwise)."""
    cmd = [sys.executable, "-m", "megatron_mm1.cli", "train", "--config", config, "--data", str(data),
           "--out", str(out), "--steps", "1", "--nproc", str(nproc), *(["--resume", resume] if resume else [])]
    for item in sets:
        cmd += ["--set", item]
    return run(cmd, check=False)


@pytest.mark.parametrize(
    "config, sets, message",
    [
        ("tiny-moe", ["parallel.expert_model_parallel_size=2"], "cannot train mixture-of-experts"),
        ("tiny", ["parallel.pipeline_model_parallel_size=2"], "pipeline_model_parallel_size=1"),
        ("tiny", [*TP2, "parallel.sequence_parallel=true"], "parallel.sequence_parallel=false"),
        ("tiny", ["checkpoint.async_save=true"], "checkpoint.async_save=false"),
    ],
    ids=["moe", "pp", "sp", "async-save"],
)
def test_refused_layouts_name_the_megatron_engine(data, tmp_path, config, sets, message):  # noqa: F811
    proc = mm1_train(data, tmp_path, [*zero("zero2"), *sets], config=config)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "training.engine=megatron" in proc.stderr


def test_missing_deepspeed_config_is_refused(data, tmp_path):  # noqa: F811
    proc = mm1_train(data, tmp_path, ["training.engine=deepspeed", "training.deepspeed_config=nowhere.json"], nproc=1)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nowhere.json does not exist" in proc.stderr and "zero3-offload.json" in proc.stderr


def _tiny(**training) -> object:
    sets = [f"training.{k}={v}" for k, v in training.items()]
    return load_config("tiny", ["training.engine=deepspeed", *sets])


def test_deepspeed_config_is_filled_from_ours():
    cfg = _tiny(global_batch_size=16, grad_clip=0.5)
    ds = read_deepspeed_config(cfg, num_microbatches=4)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False} and ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train_micro_batch_size_per_gpu": 4}, '"train_micro_batch_size_per_gpu" is 4 but our config gives 2'),
        ({"bf16": {"enabled": True}}, '"bf16.enabled" is True but our config gives False'),
        ({"optimizer": {"type": "Adam"}}, 'remove "optimizer"'),
        ({"scheduler": {"type": "WarmupLR"}}, 'remove "scheduler"'),
        ({"fp16": {"enabled": True}}, 'remove "fp16"'),
    ],
    ids=["micro-batch", "bf16", "optimizer", "scheduler", "fp16"],
)
def test_contradicting_deepspeed_config_is_refused(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **content}))
    with pytest.raises(ConfigError, match="write \"auto\" there|remove") as e:
        read_deepspeed_config(_tiny(deepspeed_config=path), num_microbatches=2)
    assert message in str(e.value)
