"""Presets, overrides, validation messages and `mm1 params` size targets."""

import json
import sys

import pytest
from conftest import run

from megatron_mm1.config import ConfigError, load_config, preset_names, validate
from megatron_mm1.models import te_spec

PRESETS = ["mm1-3b", "mm1-7b", "mm1-30b", "mm1-3b-moe-64e", "mm1-7b-moe-32e", "tiny", "tiny-moe"]


def test_all_presets_exist_and_validate():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        validate(load_config(name))


def test_overrides_are_typed():
    cfg = load_config("tiny", ["parallel.tensor_model_parallel_size=2", "model.moe.capacity_factor=1.5"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model.moe.capacity_factor == 1.5
    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size: expected int"):
        load_config("tiny", ["parallel.tensor_model_parallel_size=two"])
    with pytest.raises(ConfigError, match="unknown field.*parallel.tensor_parallel"):
        load_config("tiny", ["parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")


@pytest.mark.parametrize(
    "overrides, world_size, field",
    [
        (["parallel.tensor_model_parallel_size=3"], 3, "model.llm.num_attention_heads"),
        (["parallel.pipeline_model_parallel_size=3"], 3, "model.llm.num_layers"),
        (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"], 2, "virtual_pipeline"),
        (["parallel.tensor_model_parallel_size=2"], 3, "world size 3"),
        (["training.global_batch_size=6"], 4, "training.global_batch_size"),
        (["model.connector.num_image_tokens=8"], 1, "model.connector.num_image_tokens"),
        (["model.vision.feature_layer=-5"], 1, "model.vision.feature_layer"),
        (["parallel.expert_model_parallel_size=2"], 2, "model.moe.num_experts"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
        (["model.max_images_per_sequence=64"], 1, "model.max_images_per_sequence"),
        (["model.connector.type=perceiver"], 1, "model.connector.type"),
        (["training.hang_timeout_s=0"], 1, "training.hang_timeout_s"),
    ],
)
def test_invalid_configs_name_the_field(overrides, world_size, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(load_config("tiny", overrides), world_size=world_size)


def test_moe_validation():
    cfg = load_config("tiny-moe", ["parallel.expert_model_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"model\.moe\.num_experts=4 is not divisible"):
        validate(cfg, world_size=3)
    cfg = load_config("tiny-moe", ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel=true"):
        validate(cfg, world_size=2)


def test_invalid_config_fails_before_start_up():
    # A bad layout must be refused by `mm1` before any process group exists: a clean message
    # and exit code 2, not a traceback.
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "params", "--config", "tiny",
                "--set", "model.connector.num_image_tokens=5"], check=False)
    assert proc.returncode == 2
    assert "model.connector.num_image_tokens=5 must be a square" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_errors_of_any_kind_exit_2_with_one_message(tmp_path, capsys):
    """YAML syntax in a config file or an override, and a wrongly typed value: `mm1 train` says
    what and where in one message and exits 2."""
    from megatron_mm1.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: 10\n   lr: [1e-4\n")
    cases = [
        (["--config", str(bad)], f"{bad} is not valid YAML"),
        (["--config", "tiny", "--set", "training.lr=[1e-4"], "override 'training.lr=[1e-4': the value is not valid YAML"),
        (["--config", "tiny", "--set", "training.steps=ten"], "training.steps: expected int, got 'ten'"),
    ]
    for argv, message in cases:
        assert main(["train", *argv, "--out", str(tmp_path / "run"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# Published sizes: dense LLMs 3B/7B/30B; MoE totals 64B and 47B (MM1 paper).
TARGETS = {
    "mm1-3b": ("llm", 3e9),
    "mm1-7b": ("llm", 7e9),
    "mm1-30b": ("llm", 30e9),
    "mm1-3b-moe-64e": ("total", 64e9),
    "mm1-7b-moe-32e": ("total", 47e9),
}


def params_json(capsys, *argv: str) -> dict:
    """`mm1 params --json` in this process (the CLI's start-up is tested separately)."""
    from megatron_mm1.cli import main

    assert main(["params", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("config, overrides", [
    ("tiny", []),
    ("tiny", ["model.llm.tie_embeddings=true", "model.llm.qkv_bias=true", "model.llm.qk_layernorm=true",
              "model.vision.arch=siglip", "model.vision.activation=gelu_pytorch_tanh"]),
    ("tiny", ["model.connector.type=avg-pool", "model.vision.feature_layer=-2"]),
    ("tiny", ["model.connector.type=attn-pool"]),
    ("tiny-moe", ["model.moe.ffn_hidden_size=96"]),
])
def test_params_equal_a_model_built_on_the_meta_device(config, overrides):
    """`mm1 params` counts from the config's arithmetic; here against the model itself (the
    planner's tests do it per rank at TP, PP, VPP and EP layouts)."""
    import torch

    from megatron_mm1.arithmetic import model_parameters
    from megatron_mm1.models.mm1 import MM1Model
    from megatron_mm1.runtime import shutdown, single_process

    cfg = single_process(load_config(config, overrides))
    try:
        with torch.device("meta"):
            model = MM1Model(cfg)
    finally:
        shutdown()
    moe = cfg.model.moe
    size = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("llm", "vision", "connector")}
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    active = total - experts + experts * moe.router_topk // max(moe.num_experts, 1)
    assert model_parameters(cfg) == {"total": total, **size, "active": active}


@pytest.mark.parametrize("preset", sorted(TARGETS))
def test_params_meet_size_targets(preset, capsys):
    counts = params_json(capsys, "--config", preset)
    assert set(counts) == {"total", "llm", "vision", "connector", "active"}
    assert all(isinstance(v, int) for v in counts.values())
    field, target = TARGETS[preset]
    assert abs(counts[field] - target) / target < 0.05, counts
    assert counts["total"] == counts["llm"] + counts["vision"] + counts["connector"]
    assert 6.0e8 < counts["vision"] < 6.5e8  # ViT-H/14 at 378 (32 layers)
    if "moe" in preset:
        assert counts["active"] < counts["total"] / 5
    else:
        assert counts["active"] == counts["total"]


def test_cli_help_lists_subcommands():
    proc = run([sys.executable, "-m", "megatron_mm1.cli", "--help"])
    for command in ("params", "demo", "data"):
        assert command in proc.stdout


def test_named_vision_encoders(capsys):
    cfg = load_config("mm1-3b", ["model.vision=vit-l-14-336"])
    assert (cfg.model.vision.image_size, cfg.model.vision.num_patches) == (336, 576)
    validate(cfg)
    with pytest.raises(ConfigError, match="unknown encoder 'vit-g'"):
        load_config("mm1-3b", ["model.vision=vit-g"])
    vision = params_json(capsys, "--config", "mm1-3b", "--set", "model.vision=vit-l-14-336")["vision"]
    assert abs(vision - 303.5e6) / 303.5e6 < 0.01  # CLIP ViT-L/14 at 336 (24 layers)
    refined = load_config("mm1-3b", ["model.vision.feature_layer=-2"])
    assert (refined.model.vision.hidden_size, refined.model.vision.feature_layer) == (1280, -2)


TE_ABSENT = "Transformer Engine is absent (as the test has it)"


def test_te_spec_is_planned_anywhere_and_refused_where_it_cannot_run(tmp_path, capsys, monkeypatch):
    """`model.layer_spec=te` validates, plans and dry-runs on a machine without TE (a laptop
    planning a cluster run); `mm1 train`, `mm1 benchmark` and every worker's start-up refuse it
    there by name, before any process or process group starts. The machine is made one without
    TE whatever this one has."""
    from megatron_mm1.cli import main

    monkeypatch.setattr(te_spec, "unavailable", lambda: TE_ABSENT)
    te = ["--set", "model.layer_spec=te"]
    assert main(["train", "--config", "tiny", *te, "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert main(["plan", "--config", "mm1-3b", "--gpus", "8", *te, "--json"]) == 0
    capsys.readouterr()
    for argv in (["train", "--config", "tiny", *te, "--out", str(tmp_path / "run")],
                 ["benchmark", "--config", "tiny", "--specs", "fast,te", "--steps", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"model.layer_spec=te: {TE_ABSENT}" in err and "model.layer_spec=fast" in err, err
    assert not (tmp_path / "run").exists()
    worker = ("from megatron_mm1.config import ConfigError, load_config\n"
              "from megatron_mm1.models import te_spec\n"
              "from megatron_mm1.runtime import init_runtime\n"
              "import torch\n"
              f"te_spec.unavailable = lambda: {TE_ABSENT!r}\n"
              "try:\n    init_runtime(load_config('tiny', ['model.layer_spec=te']))\n"
              "except ConfigError as e:\n    print('REFUSED', torch.distributed.is_initialized(), e)\n")
    out = run([sys.executable, "-c", worker]).stdout
    assert out.startswith(f"REFUSED False model.layer_spec=te: {TE_ABSENT}"), out
