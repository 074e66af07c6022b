"""Start-up environment: torchrun's and Slurm's variables."""

import pytest

from megatron_mm1.config import ConfigError
from megatron_mm1.runtime import DistEnv, dist_env

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}


@pytest.fixture
def env(monkeypatch):
    for name in [*TORCHRUN, *SLURM, "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_launcher(env):
    assert dist_env() == DistEnv(0, 1, 0)


def test_torchrun_variables_win(env):
    for k, v in {**TORCHRUN, **SLURM}.items():
        env.setenv(k, v)
    assert dist_env() == DistEnv(3, 8, 1)


def test_slurm_one_task_per_gpu(env):
    for k, v in SLURM.items():
        env.setenv(k, v)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT"):
        dist_env()
    env.setenv("MASTER_ADDR", "node1")
    env.setenv("MASTER_PORT", "29500")
    assert dist_env() == DistEnv(5, 16, 5)
