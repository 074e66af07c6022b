import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")

# Two cores: one intra-op thread per process keeps 4-process runs from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(cmd: list[str], timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root (with `env` added to the environment); on failure
    show its output's tail."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *args], timeout=timeout)


def colour_tasks(folder: Path) -> list[str]:
    """A caption and a VQA task file of three plain-colour images in `folder`: their kinds."""
    import json

    from PIL import Image

    colours = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}
    for name, rgb in colours.items():
        Image.new("RGB", (40, 40), rgb).save(folder / f"{name}.png")
    tasks = {
        "caption": [{"id": n, "image": f"{n}.png", "references": [f"a {n} square", f"the {n} photo"]} for n in colours],
        "vqa": [{"id": n, "image": f"{n}.png", "question": "what colour is it?", "answers": [n] * 10} for n in colours],
    }
    for kind, items in tasks.items():
        (folder / f"{kind}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return list(tasks)


@pytest.fixture(scope="module")
def single_process_runtime():
    """One process's megatron runtime (tiny preset) for in-process model tests; torn down
    after the module unless an earlier test had started it."""
    from megatron.core import parallel_state

    from megatron_mm1.config import load_config
    from megatron_mm1.runtime import init_runtime, shutdown

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    init_runtime(load_config("tiny"))
    yield
    shutdown()


@pytest.fixture(autouse=True)
def fresh_moe_loss_scale():
    """megatron-core keeps the MoE auxiliary losses' backward scale in a class attribute. A MoE
    backward outside its pipeline schedules (the in-process model tests) creates it 0-dim, and
    the schedules then fail to copy their [1] scale into it: each test starts without one, as a
    new process does."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
