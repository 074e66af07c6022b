"""Hugging Face config.json <-> MM1's model fields: the one place that reads and writes them.

Reading accepts every layout transformers has written for the supported families: RoPE as
`rope_parameters` (transformers 5) or top-level `rope_theta`/`rope_scaling` (4.x) with
`rope_type` or the older `type`; the expert count as `num_experts`, `num_local_experts` or
`n_routed_experts`; `dtype` or `torch_dtype`. A key that is absent means its config class's
default (`DEFAULTS`). For every key read here, transformers 4.55/4.57 and 5 have the same
defaults (checked against their sources; Qwen2-MoE folders written before the `qkv_bias` key
existed have biases, which is the key's default) and, but for one YaRN bug of 4.55 and earlier
(see `_rope`), the same maths. Every key is either mapped exactly, known not to change the model's
computation (`BOOKKEEPING`), or refused by name with its value: a conversion that could be
silently wrong is refused instead.

Writing (`text_config`, `vision_config`) gives the native transformers config, in
transformers 5's layout, of the family the MM1 config names (`model.llm.hf_model_type`) or,
without one, of the first family that computes the decoder exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm1.config import VISION_ACTIVATIONS, VISION_HF_MODEL_TYPES, Config, ConfigError, yarn_mscale

BOS_ID, EOS_ID, PAD_ID = 1, 2, 3  # megatron_mm1.data.tokenizer's fixed ids


@dataclass(frozen=True)
class Family:
    """What a transformers decoder family computes, in MM1's terms."""

    architecture: str
    moe: bool
    qk_norm: bool
    # q/k/v projection biases: "never", "always" (Qwen2), or "key" (the `qkv_bias` key).
    qkv_bias: str = "never"
    # MoE on every layer (Mixtral), or every k-th from layer 0 (Qwen: mlp_only_layers).
    moe_every_layer: bool = False


FAMILIES = {
    "llama": Family("LlamaForCausalLM", moe=False, qk_norm=False),
    "mistral": Family("MistralForCausalLM", moe=False, qk_norm=False),
    "qwen2": Family("Qwen2ForCausalLM", moe=False, qk_norm=False, qkv_bias="always"),
    "qwen3": Family("Qwen3ForCausalLM", moe=False, qk_norm=True),
    "mixtral": Family("MixtralForCausalLM", moe=True, qk_norm=False, moe_every_layer=True),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", moe=True, qk_norm=False, qkv_bias="key"),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", moe=True, qk_norm=True),
}

# Class defaults of the keys read below, as transformers 5 has them; None: derived (head_dim =
# hidden_size / heads, num_key_value_heads = heads).
_COMMON = dict(
    hidden_act="silu", num_key_value_heads=None, head_dim=None, tie_word_embeddings=False,
    attention_dropout=0.0, rope_theta=10000.0, rope_scaling=None,
)
DEFAULTS: dict[str, dict] = {
    "llama": dict(_COMMON, attention_bias=False, mlp_bias=False, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "mistral": dict(_COMMON, sliding_window=4096, max_position_embeddings=131072, rms_norm_eps=1e-6),
    "mixtral": dict(
        _COMMON, sliding_window=None, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e6,
        num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
    ),
    "qwen2": dict(_COMMON, use_sliding_window=False, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen3": dict(
        _COMMON, head_dim=128, attention_bias=False, use_sliding_window=False, max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    "qwen2_moe": dict(
        _COMMON, use_sliding_window=False, max_position_embeddings=32768, rms_norm_eps=1e-6, qkv_bias=True,
        decoder_sparse_step=1, mlp_only_layers=[], num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        _COMMON, attention_bias=False, use_sliding_window=False, max_position_embeddings=32768, rms_norm_eps=1e-6,
        decoder_sparse_step=1, mlp_only_layers=[], num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=False,
    ),
}
# Keys that do not change what the model computes (training settings MM1 has its own of,
# generation and bookkeeping).
BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "output_router_logits",
    "router_aux_loss_coef", "max_window_layers", "_attn_implementation_autoset",
    # transformers 4.x Llama: split matmuls of a tensor-parallel pretraining, equal maths.
    "pretraining_tp",
}
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
ROPE_KEYS = {
    "default": {"rope_theta"},
    "linear": {"rope_theta", "factor"},
    "llama3": {"rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
             "attention_factor", "mscale", "mscale_all_dim"},
    "dynamic": {"rope_theta", "factor"},
}


class _Reader:
    """One config.json: values with their class defaults, every key accounted for."""

    def __init__(self, hf: dict, family: str):
        self.hf = hf
        self.defaults = DEFAULTS[family]
        self.used: set[str] = set()
        self.errors: list[str] = []

    def get(self, key: str, default=None):
        self.used.add(key)
        if key in self.hf:
            return self.hf[key]
        return self.defaults.get(key, default)

    def require(self, key: str, ok, why: str) -> None:
        """Refuse unless ok(value)."""
        value = self.get(key)
        if not ok(value):
            self.errors.append(f"{key}={value!r}: {why}")

    def unknown(self) -> list[str]:
        return sorted(set(self.hf) - self.used - BOOKKEEPING)


def _rope(r: _Reader, max_positions: int) -> tuple[float, dict]:
    """rope_theta and model.llm.rope_scaling fields from either layout."""
    r.used |= {"rope_parameters", "rope_scaling", "rope_theta"}
    if "rope_parameters" in r.hf:  # transformers 5
        params = dict(r.hf["rope_parameters"] or {})
        if r.hf.get("rope_scaling") not in (None, r.hf["rope_parameters"]):
            r.errors.append("rope_parameters and rope_scaling are both set, differently")
    else:  # transformers 4.x: top level
        params = dict(r.hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", r.hf.get("rope_theta", r.defaults["rope_theta"]))
    if float(r.hf.get("rope_theta", params["rope_theta"])) != float(params["rope_theta"]):
        r.errors.append(f"rope_theta={r.hf['rope_theta']} and rope_parameters' {params['rope_theta']} disagree")
    # 4.x wrote the type as `type`, later as `rope_type` (some files carry both).
    kind = params.pop("rope_type", None) or params.get("type") or "default"
    if params.pop("type", kind) != kind:
        r.errors.append("rope_type and type disagree")
    partial = params.pop("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        r.errors.append(f"partial_rotary_factor={partial}: MM1 rotates every channel")
    if kind not in ROPE_KEYS:
        r.errors.append(f"rope type {kind!r}: MM1 computes {', '.join(ROPE_KEYS)} exactly")
        return 10000.0, {}
    extra = sorted(set(params) - ROPE_KEYS[kind])
    if extra:
        r.errors.append(f"rope parameters {', '.join(f'{k}={params[k]!r}' for k in extra)} are not "
                        f"understood for rope type {kind}")
    theta = float(params["rope_theta"])
    if not theta.is_integer():
        r.errors.append(f"rope_theta={theta} is not an integer (model.llm.rotary_base is)")
    fields: dict = {"type": kind}
    original = int(params.get("original_max_position_embeddings") or max_positions)
    if kind != "default":
        factor = params["factor"]
        if factor is None and kind == "yarn":  # transformers derives it from the context lengths
            factor = max_positions / original
        fields["factor"] = float(factor)
    if kind == "llama3":
        fields.update(
            original_max_position_embeddings=original,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
        )
    if kind == "yarn":
        # As transformers reads them: a falsy beta is its default; mscale and mscale_all_dim
        # (DeepSeek's form) count only when attention_factor is absent and both are non-zero.
        attention, mscale, mscale_all_dim = (params.get(k) for k in ("attention_factor", "mscale", "mscale_all_dim"))
        if attention is None and mscale and mscale_all_dim:
            attention = yarn_mscale(fields["factor"], mscale) / yarn_mscale(fields["factor"], mscale_all_dim)
        # transformers up to 4.55 replaced the factor by max_position_embeddings /
        # original_max_position_embeddings (transformers#38224, fixed in 4.56): the factor is what
        # the model was trained with (e.g. Qwen2.5's and Qwen3's published YaRN settings), and
        # what transformers 5 computes.
        fields.update(
            original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            truncate=bool(params.get("truncate", True)),
            attention_factor=None if attention is None else float(attention),
        )
    return theta, fields


def llm_fields_from_hf(hf: dict) -> dict:
    """model.llm and model.moe fields from a native causal-LM config.json; ConfigError for a
    model MM1's decoder cannot compute exactly, naming each key and value."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"unsupported language model type '{model_type}': MM1 imports {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]
    r = _Reader(hf, model_type)
    h, heads = r.get("hidden_size"), r.get("num_attention_heads")
    r.require("hidden_act", lambda v: v == "silu", "MM1's MLP is SwiGLU (silu)")
    r.require("attention_dropout", lambda v: v == 0, "MM1 trains without attention dropout")
    r.require("mlp_bias", lambda v: not v, "MM1's MLP has no biases")
    r.require("attention_bias", lambda v: not v, "a bias on the output projection has no MM1 counterpart")
    if model_type in ("mistral", "mixtral"):
        r.require("sliding_window", lambda v: v is None,
                  "sliding-window attention is not supported (a null sliding_window is)")
    else:
        r.require("use_sliding_window", lambda v: not v, "sliding-window attention is not supported")
        r.used.add("sliding_window")  # read only with use_sliding_window
    r.require("layer_types", lambda v: v is None or set(v) <= {"full_attention"},
              "sliding-window attention is not supported")
    head_dim = r.get("head_dim")  # every family's attention reads the key when it is there
    qkv_bias = {"never": False, "always": True, "key": r.get("qkv_bias")}[family.qkv_bias]
    max_positions = r.get("max_position_embeddings")
    theta, rope = _rope(r, max_positions)
    llm = dict(
        num_layers=r.get("num_hidden_layers"),
        hidden_size=h,
        ffn_hidden_size=r.get("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=r.get("num_key_value_heads") or heads,
        vocab_size=r.get("vocab_size"),
        max_sequence_length=max_positions,
        rotary_base=int(theta),
        rope_scaling=rope,
        norm_epsilon=r.get("rms_norm_eps"),
        qk_layernorm=family.qk_norm,
        kv_channels=head_dim if head_dim not in (None, h // heads) else None,
        qkv_bias=bool(qkv_bias),
        tie_embeddings=bool(r.get("tie_word_embeddings")),
        hf_model_type=model_type,
    )
    moe = dict(num_experts=0)
    if family.moe:
        moe = _moe_fields(r, family, llm)
    unknown = r.unknown()
    if unknown:
        r.errors += [f"{k}={hf[k]!r}: not understood, so it may change the model's maths" for k in unknown]
    if r.errors:
        raise ConfigError(f"cannot import this {model_type} model exactly:\n  - " + "\n  - ".join(r.errors))
    return {"llm": llm, "moe": moe}


def _moe_fields(r: _Reader, family: Family, llm: dict) -> dict:
    present = [k for k in EXPERT_COUNT_KEYS if k in r.hf]
    r.used |= set(EXPERT_COUNT_KEYS)
    counts = {r.hf[k] for k in present}
    if len(counts) > 1:
        r.errors.append(f"expert counts disagree: {', '.join(f'{k}={r.hf[k]}' for k in present)}")
    default_key = "num_local_experts" if "num_local_experts" in r.defaults else "num_experts"
    experts = r.hf[present[0]] if present else r.defaults[default_key]
    n = llm["num_layers"]
    if family.moe_every_layer:
        r.require("router_jitter_noise", lambda v: not v, "megatron's router adds no jitter")
        return dict(num_experts=experts, layer_freq=1, router_topk=r.get("num_experts_per_tok"),
                    ffn_hidden_size=llm["ffn_hidden_size"])
    step, dense = r.get("decoder_sparse_step"), set(r.get("mlp_only_layers") or [])
    sparse = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    freq = sparse[1] - sparse[0] if len(sparse) > 1 else n
    if not (sparse and sparse == list(range(0, n, freq))):
        r.errors.append(f"MoE layers {sparse}: MM1 puts an MoE FFN every k layers starting with layer 0")
    r.require("norm_topk_prob", bool, "megatron's router renormalises the top-k weights")
    r.require("shared_expert_intermediate_size", lambda v: not v, "a shared expert has no MM1 counterpart")
    return dict(num_experts=experts, layer_freq=freq, router_topk=r.get("num_experts_per_tok"),
                ffn_hidden_size=r.get("moe_intermediate_size"))


# ----------------------------------------------------------------------------- writing


def moe_layers(cfg: Config) -> list[int]:
    moe = cfg.model.moe
    if not moe.num_experts:
        return []
    return [i for i in range(cfg.model.llm.num_layers) if i % moe.layer_freq == 0]


def export_problems(cfg: Config, name: str | None = None) -> list[str]:
    """Why transformers family `name` (default `model.llm.hf_model_type`) cannot compute this
    decoder exactly (empty: it can)."""
    llm, moe = cfg.model.llm, cfg.model.moe
    name = name or llm.hf_model_type
    family = FAMILIES.get(name)
    if family is None:
        return [f"model.llm.hf_model_type='{name}' is unknown; use one of {', '.join(FAMILIES)} or null"]
    where = f"transformers' {name}"
    problems = []
    if family.moe != bool(moe.num_experts):
        problems.append(f"{where} is {'an MoE' if family.moe else 'a dense'} family; the model is not")
    if family.qk_norm != llm.qk_layernorm:
        problems.append(f"{where} {'always' if family.qk_norm else 'never'} has QK-norm (model.llm.qk_layernorm)")
    if family.qkv_bias != "key" and (family.qkv_bias == "always") != llm.qkv_bias:
        problems.append(f"{where} {'always' if family.qkv_bias == 'always' else 'never'} has q/k/v biases "
                        "(model.llm.qkv_bias)")
    if family.moe_every_layer and moe.num_experts and moe.layer_freq != 1:
        problems.append(f"{where} has an MoE FFN in every layer (model.moe.layer_freq=1)")
    if family.moe_every_layer and moe.num_experts and (moe.ffn_hidden_size or llm.ffn_hidden_size) != llm.ffn_hidden_size:
        problems.append(f"{where}: experts are as wide as model.llm.ffn_hidden_size")
    return problems


def text_model_type(cfg: Config) -> str:
    """The transformers family export writes: the configured one, or the first that computes
    this decoder exactly."""
    llm, moe = cfg.model.llm, bool(cfg.model.moe.num_experts)
    if llm.hf_model_type:
        return llm.hf_model_type
    if moe:
        # Qwen3-MoE always has QK-norm; Qwen2-MoE never (its shared expert is written zero-width).
        return "qwen3_moe" if llm.qk_layernorm else "qwen2_moe"
    if llm.qk_layernorm:
        return "qwen3"
    return "qwen2" if llm.qkv_bias else "llama"


def _rope_parameters(cfg: Config) -> dict:
    llm = cfg.model.llm
    r = llm.rope_scaling
    out: dict = {"rope_type": r.type, "rope_theta": float(llm.rotary_base)}
    if r.type != "default":
        out["factor"] = r.factor
    if r.type == "llama3":
        out.update(original_max_position_embeddings=r.original_max_position_embeddings,
                   low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.type == "yarn":
        out.update(original_max_position_embeddings=r.original_max_position_embeddings,
                   beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        if r.attention_factor is not None:
            out["attention_factor"] = r.attention_factor
    return out


def text_config(cfg: Config) -> dict:
    """The LLM as a native transformers config (a dict with model_type); ConfigError for a
    decoder no transformers class reproduces."""
    llm, moe = cfg.model.llm, cfg.model.moe
    if moe.num_experts and moe.capacity_factor is not None:
        raise ConfigError(
            "model.moe.capacity_factor is set: megatron drops tokens over capacity, which no "
            "transformers MoE class reproduces; only dropless MoE models convert"
        )
    model_type = text_model_type(cfg)
    problems = export_problems(cfg, model_type)
    if problems:
        raise ConfigError("cannot export this decoder:\n  - " + "\n  - ".join(problems))
    family = FAMILIES[model_type]
    out = dict(
        model_type=model_type,
        architectures=[family.architecture],
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=llm.max_sequence_length,
        rms_norm_eps=llm.norm_epsilon,
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=llm.tie_embeddings,
        attention_dropout=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    out["head_dim"] = llm.head_dim
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type in ("mistral", "mixtral"):
        out.update(sliding_window=None)
    elif model_type in ("qwen3", "qwen3_moe"):
        out.update(attention_bias=False, use_sliding_window=False)
    elif model_type in ("qwen2", "qwen2_moe"):
        out.update(use_sliding_window=False)
    if model_type == "mixtral":
        out.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.router_topk, router_jitter_noise=0.0,
                   output_router_logits=False)
    elif moe.num_experts:
        sparse = set(moe_layers(cfg))
        out.update(
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.router_topk,
            moe_intermediate_size=moe.ffn_hidden_size or llm.ffn_hidden_size,
            # megatron's default router (score function softmax, moe_router_pre_softmax=False)
            # takes the top-k logits and softmaxes over them: the same as a softmax over all
            # experts renormalised over the top k, i.e. norm_topk_prob=True.
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(llm.num_layers) if i not in sparse],
            output_router_logits=False,
        )
        if model_type == "qwen2_moe":
            out.update(qkv_bias=llm.qkv_bias, shared_expert_intermediate_size=0)
    return out


# ----------------------------------------------------------------------------- vision

# Vision classes: model_type -> (model.vision.arch, the class's defaults for every key MM1
# reads; the same in transformers 4.x and 5). A composite folder (CLIPModel, SiglipModel...)
# holds its tower's config under vision_config.
VISION_FAMILIES = {
    "clip_vision_model": ("clip", dict(
        hidden_act="quick_gelu", layer_norm_eps=1e-5, hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32)),
    "siglip_vision_model": ("siglip", dict(
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16)),
    # SigLIP2's NaFlex tower; the fixed-resolution SigLIP2 checkpoints are siglip_vision_model.
    "siglip2_vision_model": ("siglip", dict(
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, num_patches=256, patch_size=16)),
}
COMPOSITE_VISION = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}
VISION_BOOKKEEPING = BOOKKEEPING | {
    "projection_dim", "initializer_factor",
    # SigLIP's attention-pooling head feeds only the pooled output, which MM1 does not read.
    "vision_use_head",
    # Generation and bookkeeping settings that transformers 4.x wrote into every sub-config; an
    # encoder's forward reads none of them (pruned_heads is checked).
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores", "prefix",
    "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
    "top_k", "top_p", "torchscript", "typical_p", "use_bfloat16", "pruned_heads",
}


def vision_hf_model_type(cfg: Config) -> str:
    v = cfg.model.vision
    return v.hf_model_type or VISION_HF_MODEL_TYPES[v.arch][0]


def vision_config(cfg: Config) -> dict:
    """The encoder as its transformers vision config dict, with only the layers MM1 runs."""
    v = cfg.model.vision
    model_type = vision_hf_model_type(cfg)
    out = dict(
        model_type=model_type,
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers_used,
        num_attention_heads=v.num_attention_heads,
        patch_size=v.patch_size,
        num_channels=3,
        hidden_act=v.activation,
        layer_norm_eps=v.layernorm_epsilon,
        attention_dropout=0.0,
    )
    if model_type == "siglip2_vision_model":
        out["num_patches"] = v.num_patches
    else:
        out["image_size"] = v.image_size
    if v.arch == "siglip":
        out["vision_use_head"] = False  # MM1 reads hidden states, never the pooled output
    return out


def vision_fields_from_hf(hf: dict) -> dict:
    """model.vision fields from a vision tower's config.json (CLIP, SigLIP or SigLIP2; the tower's
    own, or a composite model's vision_config); ConfigError naming what MM1's ViT cannot compute
    exactly."""
    if hf.get("model_type") in COMPOSITE_VISION:
        hf = dict(hf.get("vision_config") or {}, model_type=COMPOSITE_VISION[hf["model_type"]])
    model_type = hf.get("model_type")
    if model_type not in VISION_FAMILIES:
        raise ConfigError(
            f"--vision: expected a CLIP, SigLIP or SigLIP2 vision folder (model_type "
            f"{', '.join(list(COMPOSITE_VISION) + list(VISION_FAMILIES))}), got model_type={model_type}"
        )
    arch, defaults = VISION_FAMILIES[model_type]
    get = lambda k: hf.get(k, defaults.get(k))  # noqa: E731
    errors = []
    if get("hidden_act") not in VISION_ACTIVATIONS:
        errors.append(f"hidden_act={get('hidden_act')!r}: MM1's ViT computes {', '.join(VISION_ACTIVATIONS)}")
    if hf.get("num_channels", 3) != 3:
        errors.append(f"num_channels={hf['num_channels']}: MM1 feeds RGB images")
    if hf.get("attention_dropout") or hf.get("dropout"):
        errors.append("dropout: MM1 trains the ViT without dropout")
    if hf.get("pruned_heads"):
        errors.append(f"pruned_heads={hf['pruned_heads']!r}: MM1's ViT has every head in every layer")
    known = set(defaults) | {"num_channels", "attention_dropout", "dropout"} | VISION_BOOKKEEPING
    errors += [f"{k}={hf[k]!r}: not understood, so it may change the encoder's maths" for k in sorted(set(hf) - known)]
    patch = get("patch_size")
    if model_type == "siglip2_vision_model":
        # NaFlex: a square grid of num_patches position embeddings, resized to each image's grid.
        # At MM1's fixed square resolution of that grid the resize is the identity.
        grid = int(round(get("num_patches") ** 0.5))
        if grid * grid != get("num_patches"):
            errors.append(f"num_patches={get('num_patches')} is not a square grid")
        image_size = grid * patch
    else:
        image_size = get("image_size")
    if not isinstance(image_size, int) or not isinstance(patch, int):
        errors.append(f"image_size={image_size!r}, patch_size={patch!r}: MM1's ViT takes square images and patches")
    if errors:
        raise ConfigError(f"--vision: cannot import this {model_type} encoder exactly:\n  - " + "\n  - ".join(errors))
    return dict(
        arch=arch,
        hf_model_type=model_type,
        image_size=image_size,
        patch_size=patch,
        hidden_size=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        ffn_hidden_size=get("intermediate_size"),
        layernorm_epsilon=get("layer_norm_eps"),
        activation=get("hidden_act"),
    )
