"""Typed configuration: plain dataclasses, YAML presets under configs/, `--set a.b=value` overrides.

Validation (`validate`) is pure: it runs before any process group or device memory exists and
every error names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


class RunRefused(ConfigError):
    """A reason to stop that every rank of a run finds alike (a verdict shared through a
    collective, or a check of the same files); rank 0 alone reports it."""


@dataclass
class VisionConfig:
    """ViT image encoder: CLIP's (a class token and a LayerNorm before the layers) or SigLIP's
    (neither, and a bias on the patch convolution). The encoder's patch grid feeds the connector."""

    arch: str = "clip"  # clip | siglip
    # The images' side; a remainder after whole patches is cut off, as SigLIP's 384 px / 14 px does.
    image_size: int = 378
    patch_size: int = 14
    hidden_size: int = 1280
    num_layers: int = 32
    num_attention_heads: int = 16
    ffn_hidden_size: int = 5120
    layernorm_epsilon: float = 1e-5
    # The MLP's activation: quick_gelu (OpenAI's CLIP), gelu (the LAION and DFN ViT-H) or
    # gelu_pytorch_tanh (SigLIP).
    activation: str = "quick_gelu"
    # Which encoder layer's output feeds the connector: -1 the last, -2 the penultimate, or a
    # 1-based layer number. Layers after it are never run, so they are not built.
    feature_layer: int = -1
    # The transformers class the weights came from, written back by `to-hf`: clip_vision_model,
    # siglip_vision_model or siglip2_vision_model (null: the arch's own).
    hf_model_type: Optional[str] = None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def sequence_length(self) -> int:
        """Tokens per image in the encoder: the patches, and CLIP's class token."""
        return self.num_patches + (self.arch == "clip")

    @property
    def num_layers_used(self) -> int:
        return self.num_layers + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer


VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
# The transformers vision classes of each arch.
VISION_HF_MODEL_TYPES = {
    "clip": ("clip_vision_model",),
    "siglip": ("siglip_vision_model", "siglip2_vision_model"),
}

# Named encoders, usable as `--set model.vision=vit-l-14-336`.
VISION_PRESETS = {
    "vit-h-14-378": dict(image_size=378, patch_size=14, hidden_size=1280, num_layers=32,
                         num_attention_heads=16, ffn_hidden_size=5120),
    "vit-l-14-336": dict(image_size=336, patch_size=14, hidden_size=1024, num_layers=24,
                         num_attention_heads=16, ffn_hidden_size=4096),
    "vit-tiny-14-56": dict(image_size=56, patch_size=14, hidden_size=64, num_layers=2,
                           num_attention_heads=4, ffn_hidden_size=128),
}


@dataclass
class ConnectorConfig:
    """Vision-language connector: MM1's C-Abstractor or one of its two ablation connectors."""

    type: str = "c-abstractor"  # c-abstractor | avg-pool | attn-pool
    num_image_tokens: int = 144  # N image tokens per image in the LLM sequence
    hidden_size: int = 1024  # C-Abstractor RegNet width
    depth: int = 3  # RegNet blocks per stage
    mlp_depth: int = 2  # readout: Linear (-> SiLU -> Linear) x (mlp_depth - 1)


@dataclass
class MoEConfig:
    """Mixture-of-experts FFNs in the LLM (num_experts = 0 means dense)."""

    num_experts: int = 0
    layer_freq: int = 2  # an MoE FFN every k layers, starting with the first
    router_topk: int = 2
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.001
    capacity_factor: Optional[float] = None  # None: dropless
    token_dispatcher: str = "alltoall"  # alltoall | allgather
    ffn_hidden_size: Optional[int] = None  # per expert; defaults to llm.ffn_hidden_size


@dataclass
class RopeScalingConfig:
    """RoPE context extension, as transformers' `rope_parameters` name it.

    default: none. linear: positions divided by `factor`. llama3: Llama 3.1's per-frequency
    interpolation (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`). yarn: YaRN's ramp from interpolated (/ `factor`) to
    original frequencies between `beta_slow` and `beta_fast` rotations in
    `original_max_position_embeddings` (its ends rounded out to whole dimensions if `truncate`),
    with cos and sin scaled by `attention_factor` (None: 0.1 ln(factor) + 1). dynamic: dynamic NTK,
    which rescales the frequencies only for sequences longer than model.llm.max_sequence_length
    (transformers' max_position_embeddings), which MM1 never runs: the default RoPE wherever MM1
    computes, kept so that the export is the source's model again."""

    type: str = "default"  # default | linear | llama3 | yarn | dynamic
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: Optional[float] = None

    @property
    def attention_scale(self) -> float:
        """What the rotation multiplies queries and keys by (1 but for yarn)."""
        if self.type != "yarn":
            return 1.0
        return self.attention_factor if self.attention_factor is not None else yarn_mscale(self.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, as transformers computes it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


ROPE_SCALING_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass
class LLMConfig:
    """Decoder-only LLM: RMSNorm, SwiGLU, RoPE, grouped-query attention."""

    num_layers: int = 26
    hidden_size: int = 3072
    ffn_hidden_size: int = 8192
    num_attention_heads: int = 24
    num_query_groups: int = 8
    vocab_size: int = 64000  # the tokenizer's; the model's is padded_vocab_size
    # The embedding and output layer have vocab_size rounded up to a multiple of this
    # (Megatron-LM's default, 128); the padded ids are never seen and their logits are -inf.
    make_vocab_size_divisible_by: int = 128
    max_sequence_length: int = 4096
    rotary_base: int = 500000
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    kv_channels: Optional[int] = None  # per-head width; None: hidden_size / num_attention_heads
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    tie_embeddings: bool = False  # the output layer reuses the input embedding (Llama-3.2 1B/3B)
    # The transformers family `mm1 convert to-hf` writes (llama, mistral, qwen2, qwen3,
    # mixtral, qwen2_moe, qwen3_moe); None: the first that computes this decoder exactly.
    # `from-hf` records the source's.
    hf_model_type: Optional[str] = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the embedding and the output layer (the same at every TP: see docs/model.md)."""
        d = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // d) * d


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    image_token_id: int = 4  # the `<image>` placeholder; each image fills N consecutive ones
    max_images_per_sequence: int = 16
    logits_z_loss_coeff: float = 0.0  # z-loss on the LM logits, 0 = off
    freeze_vision: bool = False
    freeze_connector: bool = False
    freeze_llm: bool = False
    # local: megatron-core's attention with dense masks; fast: by packed sample (varlen flash on
    # GPU); te: megatron-core's Transformer Engine layers, THD packing (needs TE and CUDA)
    layer_spec: str = "local"
    init_method_std: float = 0.02


@dataclass
class ParallelConfig:
    """Parallel layout, named as in megatron-core's ModelParallelConfig."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None: equal to tensor_model_parallel_size
    context_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class DatasetEntry:
    """One prepared folder in data.datasets: its samples of one kind, or of every kind it holds
    ("auto"), each at `weight` among its kind's datasets."""

    path: str
    kind: str = "auto"  # auto | interleaved | caption | text | chat
    weight: float = 1.0


@dataclass
class DataConfig:
    """Training data: prepared shard folders (see `mm1 data prepare`) mixed by kind and weight."""

    path: Optional[str] = None  # one prepared folder: each kind it holds is a dataset of weight 1
    # Datasets as a list, e.g. [{path: laion, kind: caption, weight: 2}, {path: obelics}]; the
    # same mixture as the per-kind maps below, which it adds to (a folder once per kind).
    datasets: list[DatasetEntry] = field(default_factory=list)
    seq_length: int = 4096
    tokenizer: Optional[str] = None  # SentencePiece model file
    # More datasets per kind: {prepared folder: weight}; a folder contributes its shards of that kind.
    interleaved: dict[str, float] = field(default_factory=dict)
    caption: dict[str, float] = field(default_factory=dict)
    text: dict[str, float] = field(default_factory=dict)
    chat: dict[str, float] = field(default_factory=dict)  # supervised fine-tuning conversations
    # MM1's mixture across kinds (renormalised over the kinds that have data).
    interleaved_weight: float = 45.0
    caption_weight: float = 45.0
    text_weight: float = 10.0
    chat_weight: float = 100.0  # relative too: a chat-only fine-tuning set needs no setting
    seed: Optional[int] = None  # data order seed; None: training.seed
    num_workers: int = 2  # image-decoding worker processes per loader (0: in the calling process)
    # Validation data (training.eval_interval), one of: a prepared folder, each kind it holds
    # weighted as in training; or this fraction of every training dataset, held out (the same
    # samples whatever the seed or the folder's location) and never trained on.
    valid_path: Optional[str] = None
    valid_fraction: float = 0.0


@dataclass
class TrainingConfig:
    engine: str = "megatron"  # megatron (every layout) | deepspeed (ZeRO, dense, TP only)
    deepspeed_config: str = "deepspeed_configs/zero2.json"  # read by the deepspeed engine
    micro_batch_size: int = 1
    global_batch_size: int = 512
    seed: int = 1234
    bf16: bool = True
    steps: int = 200000
    lr: Optional[float] = None  # peak; None: MM1's fit exp(-0.4214 ln N - 0.5535), see recipe.py
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak
    warmup_steps: int = 2000
    weight_decay: Optional[float] = None  # AdamW coefficient; None: 0.1 (MM1's 0.1 x peak LR per step)
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    distributed_optimizer: bool = True  # megatron engine: shard optimizer state over DP
    overlap_grad_reduce: bool = True  # megatron engine: reduce gradients during backward
    # megatron engine with the distributed optimizer: gather updated parameters during the next
    # forward, bucket by bucket, instead of at the end of the optimizer step
    overlap_param_gather: bool = True
    recompute_llm: str = "none"  # none | selective (attention core) | full (whole layers)
    recompute_vision: str = "none"
    # Bit-identical reruns on a GPU (cuDNN's and torch's deterministic algorithms, a fixed cuBLAS
    # workspace), at some speed; CPU runs are deterministic anyway.
    deterministic: bool = False
    log_interval: int = 1
    peak_tflops: Optional[float] = None  # per GPU, for MFU; None: the GPU type's bf16 dense peak
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf steps (skipped) before the run stops
    # A rank on which no step has finished for this long dumps its threads' stacks and ends the
    # run (exit 76); collectives time out a minute later. Well above a save's duration.
    hang_timeout_s: float = 1800.0
    # Save and stop (exit 75, to be resumed) after this many steps in this process; for
    # allocations shorter than the run.
    exit_after_steps: Optional[int] = None
    # With validation data (data.valid_path or data.valid_fraction): the validation loss of
    # each kind over eval_iters global batches, every eval_interval steps, at the last step and
    # before the first step of a new run. The batches are the same every time.
    eval_interval: int = 1000
    eval_iters: int = 10


@dataclass
class CheckpointConfig:
    save_interval: int = 1000  # steps; a checkpoint is also saved at the end and on SIGTERM/SIGUSR1
    keep_last: int = 3  # newest complete checkpoints kept
    load_optimizer: bool = True  # false: resume weights (and data, schedule) with a fresh optimizer
    # Fine-tuning: start from this checkpoint's weights (any layout), with a fresh optimizer,
    # schedule and data order. Ignored when --resume finds a checkpoint of this run.
    finetune_from: Optional[str] = None
    # Periodic saves written by forked processes while training goes on (megatron engine);
    # the stop, NaN and last saves still wait for theirs. docs/training.md has the figures.
    async_save: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"unknown config '{name_or_path}': give a YAML path or one of the presets "
            f"{', '.join(preset_names())}"
        )
    return preset


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check and convert a YAML value to the dataclass field's type."""
    origin = get_origin(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
        origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown field(s) {', '.join(where + u for u in unknown)}; "
            f"valid fields of {prefix or 'the config'}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like a.b=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)})") from None


def parse_layout(overrides: list[str]) -> ParallelConfig:
    """A parallel layout from `parallel.KEY=VALUE` overrides over the one-process default (the
    layout of a command that loads a checkpoint at any layout: `mm1 generate`, `mm1 eval`)."""
    values = {}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) != 2 or keys[0] != "parallel":
            raise ConfigError(f"--set {item}: only the layout can be set here (parallel.KEY=VALUE)")
        values[keys[1]] = value
    return _build(ParallelConfig, values, "parallel")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def _merge(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def load_config(name_or_path: str, overrides: Optional[list[str]] = None) -> Config:
    """Load a preset name or YAML path and apply `a.b=value` overrides (later wins)."""
    path = _resolve(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{name_or_path}: the top level must be a mapping")
    _expand_named_encoder(tree)
    for item in overrides or []:
        _merge(tree, *parse_override(item))
        _expand_named_encoder(tree)
    return _build(Config, tree)


def _expand_named_encoder(tree: dict) -> None:
    """`model.vision: NAME` stands for that encoder's fields; later overrides refine them."""
    model = tree.get("model")
    name = model.get("vision") if isinstance(model, dict) else None
    if isinstance(name, str):
        if name not in VISION_PRESETS:
            raise ConfigError(
                f"model.vision: unknown encoder '{name}'; use one of {', '.join(VISION_PRESETS)}"
            )
        model["vision"] = dict(VISION_PRESETS[name])


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, message: str, errors: list[str]) -> None:
    if not ok:
        errors.append(message)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Raise ConfigError listing every problem; touches no process group or device."""
    errors: list[str] = []
    m, p, v, c, llm, moe = cfg.model, cfg.parallel, cfg.model.vision, cfg.model.connector, cfg.model.llm, cfg.model.moe
    tp, pp, ep, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.expert_model_parallel_size,
        p.context_parallel_size,
    )
    etp = p.expert_tensor_parallel_size or tp

    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "context_parallel_size",
    ):
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1", errors)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))

    # LLM shapes against the layout.
    _check(
        llm.num_attention_heads % tp == 0,
        f"model.llm.num_attention_heads={llm.num_attention_heads} is not divisible by "
        f"parallel.tensor_model_parallel_size={tp}; choose a TP size that divides it",
        errors,
    )
    _check(
        llm.num_attention_heads % llm.num_query_groups == 0,
        f"model.llm.num_attention_heads={llm.num_attention_heads} is not a multiple of "
        f"model.llm.num_query_groups={llm.num_query_groups}",
        errors,
    )
    _check(
        llm.num_query_groups % tp == 0,
        f"model.llm.num_query_groups={llm.num_query_groups} is not divisible by "
        f"parallel.tensor_model_parallel_size={tp}; lower TP or raise the query groups",
        errors,
    )
    _check(
        llm.kv_channels is not None or llm.hidden_size % llm.num_attention_heads == 0,
        f"model.llm.hidden_size={llm.hidden_size} is not divisible by "
        f"model.llm.num_attention_heads={llm.num_attention_heads}; set model.llm.kv_channels",
        errors,
    )
    rope = llm.rope_scaling
    _check(
        rope.type in ROPE_SCALING_TYPES,
        f"model.llm.rope_scaling.type='{rope.type}' is unknown; use one of {', '.join(ROPE_SCALING_TYPES)}",
        errors,
    )
    _check(
        rope.type == "default" or rope.factor >= 1,
        f"model.llm.rope_scaling.factor={rope.factor} must be >= 1",
        errors,
    )
    _check(
        rope.type not in ("llama3", "yarn") or (rope.original_max_position_embeddings or 0) > 0,
        f"model.llm.rope_scaling.type={rope.type} needs model.llm.rope_scaling.original_max_position_embeddings",
        errors,
    )
    _check(
        rope.type != "llama3" or rope.high_freq_factor > rope.low_freq_factor,
        "model.llm.rope_scaling.high_freq_factor must be above low_freq_factor",
        errors,
    )
    if llm.hf_model_type is not None:
        from megatron_mm1.hf.hf_config import export_problems

        errors += [f"model.llm.hf_model_type: {p}" for p in export_problems(cfg)]
    _check(
        llm.ffn_hidden_size % tp == 0,
        f"model.llm.ffn_hidden_size={llm.ffn_hidden_size} is not divisible by "
        f"parallel.tensor_model_parallel_size={tp}",
        errors,
    )
    vpp = p.virtual_pipeline_model_parallel_size
    stages = pp * (vpp or 1)
    _check(
        llm.num_layers % stages == 0,
        f"model.llm.num_layers={llm.num_layers} is not divisible by "
        f"parallel.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = {stages}; "
        "change the layer count or the pipeline layout",
        errors,
    )
    if vpp is not None:
        _check(vpp >= 2, "parallel.virtual_pipeline_model_parallel_size must be >= 2 or unset", errors)
        _check(pp >= 2, "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2", errors)
    _check(
        not p.sequence_parallel or tp > 1,
        "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1; set it to false",
        errors,
    )
    _check(cp == 1, "parallel.context_parallel_size > 1 is not supported yet; set it to 1", errors)

    # Vision shapes.
    _check(
        v.arch in VISION_HF_MODEL_TYPES,
        f"model.vision.arch='{v.arch}' is unknown; use one of {', '.join(VISION_HF_MODEL_TYPES)}",
        errors,
    )
    _check(
        v.hf_model_type is None or v.hf_model_type in VISION_HF_MODEL_TYPES.get(v.arch, ()),
        f"model.vision.hf_model_type='{v.hf_model_type}' is not a {v.arch} encoder; use one of "
        f"{', '.join(VISION_HF_MODEL_TYPES.get(v.arch, ()))} or null",
        errors,
    )
    _check(
        v.patch_size <= v.image_size,
        f"model.vision.patch_size={v.patch_size} is larger than model.vision.image_size={v.image_size}",
        errors,
    )
    _check(
        v.num_attention_heads % tp == 0,
        f"model.vision.num_attention_heads={v.num_attention_heads} is not divisible by "
        f"parallel.tensor_model_parallel_size={tp}; the vision encoder uses the LLM's TP",
        errors,
    )
    _check(
        v.hidden_size % v.num_attention_heads == 0,
        f"model.vision.hidden_size={v.hidden_size} is not divisible by model.vision.num_attention_heads",
        errors,
    )
    _check(
        v.ffn_hidden_size % tp == 0,
        f"model.vision.ffn_hidden_size={v.ffn_hidden_size} is not divisible by "
        f"parallel.tensor_model_parallel_size={tp}",
        errors,
    )
    _check(
        v.activation in VISION_ACTIVATIONS,
        f"model.vision.activation='{v.activation}' is unknown; use one of {', '.join(VISION_ACTIVATIONS)}",
        errors,
    )
    _check(
        1 <= v.num_layers_used <= v.num_layers,
        f"model.vision.feature_layer={v.feature_layer} is outside the encoder's "
        f"{v.num_layers} layers (use -1..-{v.num_layers} or 1..{v.num_layers})",
        errors,
    )

    # Connector.
    _check(
        c.type in ("c-abstractor", "avg-pool", "attn-pool"),
        f"model.connector.type='{c.type}' is unknown; use c-abstractor, avg-pool or attn-pool",
        errors,
    )
    n = c.num_image_tokens
    side = math.isqrt(n) if n > 0 else 0
    if c.type in ("c-abstractor", "avg-pool"):
        _check(
            side * side == n,
            f"model.connector.num_image_tokens={n} must be a square (e.g. 64 or 144) for the "
            f"{c.type} connector, which pools to a sqrt(N) x sqrt(N) grid",
            errors,
        )
        _check(
            0 < side <= v.grid_size,
            f"model.connector.num_image_tokens={n} pools to {side}x{side}, larger than the "
            f"encoder's {v.grid_size}x{v.grid_size} patch grid",
            errors,
        )
    _check(c.num_image_tokens > 0, "model.connector.num_image_tokens must be > 0", errors)
    _check(c.depth >= 1 and c.mlp_depth >= 1, "model.connector.depth and mlp_depth must be >= 1", errors)

    # The vocabulary: megatron splits the padded one evenly across the TP ranks.
    multiple = llm.make_vocab_size_divisible_by
    _check(multiple >= 1, "model.llm.make_vocab_size_divisible_by must be >= 1", errors)
    if multiple >= 1:
        _check(
            llm.padded_vocab_size % tp == 0,
            f"model.llm.vocab_size={llm.vocab_size} padded to a multiple of "
            f"model.llm.make_vocab_size_divisible_by={multiple} is {llm.padded_vocab_size}, which "
            f"parallel.tensor_model_parallel_size={tp} does not divide; set "
            f"model.llm.make_vocab_size_divisible_by to a multiple of {tp} (e.g. {math.lcm(multiple, tp)})",
            errors,
        )

    # Image placement.
    _check(
        0 <= m.image_token_id < llm.vocab_size,
        f"model.image_token_id={m.image_token_id} is outside the vocabulary (model.llm.vocab_size={llm.vocab_size})",
        errors,
    )
    _check(
        1 <= m.max_images_per_sequence,
        "model.max_images_per_sequence must be >= 1",
        errors,
    )
    _check(
        m.max_images_per_sequence * n <= cfg.data.seq_length,
        f"model.max_images_per_sequence={m.max_images_per_sequence} images x {n} tokens do not "
        f"fit data.seq_length={cfg.data.seq_length}",
        errors,
    )
    _check(
        cfg.data.seq_length <= llm.max_sequence_length,
        f"data.seq_length={cfg.data.seq_length} exceeds model.llm.max_sequence_length={llm.max_sequence_length}",
        errors,
    )
    if p.sequence_parallel:
        _check(
            cfg.data.seq_length % tp == 0,
            f"data.seq_length={cfg.data.seq_length} must be divisible by "
            f"parallel.tensor_model_parallel_size={tp} under sequence parallelism",
            errors,
        )
    _check(
        m.layer_spec in ("local", "fast", "te"),
        f"model.layer_spec='{m.layer_spec}' is unknown; use local, fast (torch SDPA attention) "
        "or te (Transformer Engine)",
        errors,
    )

    # MoE.
    if moe.num_experts > 0:
        _check(
            moe.num_experts % ep == 0,
            f"model.moe.num_experts={moe.num_experts} is not divisible by "
            f"parallel.expert_model_parallel_size={ep}",
            errors,
        )
        _check(
            1 <= moe.router_topk <= moe.num_experts,
            f"model.moe.router_topk={moe.router_topk} must be between 1 and model.moe.num_experts",
            errors,
        )
        _check(moe.layer_freq >= 1, "model.moe.layer_freq must be >= 1", errors)
        _check(
            moe.token_dispatcher in ("alltoall", "allgather"),
            f"model.moe.token_dispatcher='{moe.token_dispatcher}' is unknown; use alltoall or allgather",
            errors,
        )
        _check(
            not (tp > 1 and not p.sequence_parallel),
            "MoE with parallel.tensor_model_parallel_size > 1 needs parallel.sequence_parallel=true "
            "(megatron-core requires it); set it",
            errors,
        )
        _check(
            moe.capacity_factor is None or moe.capacity_factor > 0,
            "model.moe.capacity_factor must be > 0, or null for dropless routing",
            errors,
        )
        _check(
            (moe.ffn_hidden_size or llm.ffn_hidden_size) % etp == 0,
            f"the expert FFN size is not divisible by the expert tensor parallel size {etp}",
            errors,
        )
        # `fast` runs the experts as torch._grouped_mm, which refuses rows that are not a
        # multiple of 16 bytes; real models' sizes always are, so this refuses toy shapes only.
        align = 8 if cfg.training.bf16 else 4
        _check(
            m.layer_spec != "fast"
            or (llm.hidden_size % align == 0 and (moe.ffn_hidden_size or llm.ffn_hidden_size) // etp % align == 0),
            f"model.layer_spec=fast runs the experts as grouped GEMMs, which need model.llm.hidden_size "
            f"and the expert FFN size per expert-TP rank to be multiples of {align} "
            f"({16 // align}-byte {'bf16' if cfg.training.bf16 else 'fp32'}); use model.layer_spec=local",
            errors,
        )
    else:
        _check(
            ep == 1,
            f"parallel.expert_model_parallel_size={ep} needs a mixture-of-experts model "
            "(model.moe.num_experts > 0); set it to 1",
            errors,
        )

    # World size and batches.
    model_parallel = tp * pp * cp
    if world_size is not None:
        _check(
            world_size % model_parallel == 0,
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = "
            f"{model_parallel}; change the process count or the layout under parallel.",
            errors,
        )
        if world_size % model_parallel == 0:
            dp = world_size // model_parallel
            _check(
                (dp * cp * tp) % (ep * etp) == 0,
                f"expert layout EP x ETP = {ep} x {etp} does not divide DP x CP x TP = "
                f"{dp} x {cp} x {tp} at world size {world_size}",
                errors,
            )
            _check(
                cfg.training.global_batch_size % (cfg.training.micro_batch_size * dp) == 0,
                f"training.global_batch_size={cfg.training.global_batch_size} is not divisible by "
                f"training.micro_batch_size x data-parallel size = {cfg.training.micro_batch_size} x {dp}",
                errors,
            )
    t = cfg.training
    _check(t.steps >= 1, "training.steps must be >= 1", errors)
    _check(t.lr is None or t.lr > 0, "training.lr must be > 0 (or null for MM1's fit)", errors)
    for name in ("recompute_llm", "recompute_vision"):
        _check(
            getattr(t, name) in ("none", "selective", "full"),
            f"training.{name}='{getattr(t, name)}' is unknown; use none, selective or full",
            errors,
        )
    _check(
        t.engine in ("megatron", "deepspeed"),
        f"training.engine='{t.engine}' is unknown; use megatron or deepspeed",
        errors,
    )
    if t.engine == "deepspeed":
        _check(
            moe.num_experts == 0,
            "training.engine=deepspeed cannot train mixture-of-experts models (DeepSpeed only "
            "knows its own MoE layers): use training.engine=megatron",
            errors,
        )
        _check(
            pp == 1,
            "training.engine=deepspeed does not run megatron-core's pipeline schedules: set "
            "parallel.pipeline_model_parallel_size=1 or use training.engine=megatron",
            errors,
        )
        _check(
            not p.sequence_parallel,
            "training.engine=deepspeed does not reduce sequence-parallel norm gradients: set "
            "parallel.sequence_parallel=false or use training.engine=megatron",
            errors,
        )
        _check(
            not cfg.checkpoint.async_save,
            "checkpoint.async_save=true needs training.engine=megatron (DeepSpeed's checkpoints "
            "are written synchronously): set checkpoint.async_save=false",
            errors,
        )
    _check(cfg.checkpoint.save_interval >= 1, "checkpoint.save_interval must be >= 1", errors)
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1", errors)
    _check(t.max_nonfinite_steps >= 1, "training.max_nonfinite_steps must be >= 1", errors)
    _check(t.hang_timeout_s > 0, "training.hang_timeout_s must be > 0 (seconds)", errors)
    _check(0 <= t.min_lr_ratio <= 1, "training.min_lr_ratio must be between 0 and 1", errors)
    _check(t.micro_batch_size >= 1, "training.micro_batch_size must be >= 1", errors)
    d = cfg.data
    for i, entry in enumerate(d.datasets):
        _check(
            entry.kind in ("auto", "interleaved", "caption", "text", "chat"),
            f"data.datasets[{i}].kind='{entry.kind}' is unknown; use auto, interleaved, caption, text or chat",
            errors,
        )
        _check(entry.weight >= 0, f"data.datasets[{i}].weight must be >= 0", errors)
    _check(0 <= d.valid_fraction < 1, "data.valid_fraction must be >= 0 and < 1 (0: none held out)", errors)
    _check(
        not (d.valid_path and d.valid_fraction),
        "data.valid_path and data.valid_fraction both name validation data: set one of them",
        errors,
    )
    _check(t.eval_interval >= 1, "training.eval_interval must be >= 1 (steps)", errors)
    _check(t.eval_iters >= 1, "training.eval_iters must be >= 1 (global batches per kind)", errors)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)
