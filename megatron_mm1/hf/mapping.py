"""Names, layouts and configs between megatron_mm1 and Hugging Face transformers.

Megatron names are those of one MM1Model built in one process (TP = PP = EP = 1), e.g.
`llm.decoder.layers.3.self_attention.linear_qkv.weight`; dist_checkpointing maps every saved
layout onto them. Hugging Face names are those of:

- the vision tower: transformers' `CLIPVisionModel` (`<vision prefix>embeddings...`);
- the connector: `modeling_mm1.py`'s modules, named as in megatron_mm1 (`connector.*`);
- the LLM: a native causal LM (`<llm prefix>model.layers.3.self_attn.q_proj.weight`):
  Llama (dense), Qwen3 (dense + QK-norm), Qwen2-MoE (MoE) or Qwen3-MoE (MoE + QK-norm).

Two fused megatron tensors are split:
- `linear_qkv` rows are grouped by query group: for each of the G groups, its q heads, then
  one k head, then one v head (megatron SelfAttention.get_query_key_value_tensors);
- `linear_fc1` of a SwiGLU MLP is [gate; up] stacked along the rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_mm1.config import Config, ConfigError

# Where each part lives in an exported MM1 folder (modeling_mm1.MM1ForConditionalGeneration).
MM1_VISION_PREFIX = "vision_tower.vision_model."
MM1_LLM_PREFIX = "language_model."
# transformers' CLIPVisionModel and CLIPModel both keep the tower under `vision_model.`.
CLIP_VISION_PREFIX = "vision_model."

BOS_ID, EOS_ID, PAD_ID = 1, 2, 3  # megatron_mm1.data.tokenizer's fixed ids


def group_of(name: str) -> str:
    """The conversion unit a megatron tensor belongs to; tensors move one group at a time.

    An LLM group is one decoder layer. The ViT's layers are saved as stacked tensors (one
    checkpoint key per parameter, a leading layer axis) and megatron reads a key only whole,
    so a ViT group is one parameter across all layers (e.g. every layer's fc1 weight).
    """
    m = re.match(r"llm\.decoder\.layers\.\d+\.", name)
    if m:
        return m.group(0)[:-1]
    m = re.fullmatch(r"vision\.transformer\.layers\.\d+\.(.+)", name)
    if m:
        return "vision.transformer.layers.*." + m.group(1)
    for prefix, group in (
        ("vision.", "vision.embeddings"),
        ("connector.", "connector"),
        ("llm.embedding.", "llm.embedding"),
    ):
        if name.startswith(prefix):
            return group
    return "llm.head"  # final norm and output layer


# ----------------------------------------------------------------------------- fused tensors


def split_qkv(t: torch.Tensor, groups: int, q_per_group: int, head_dim: int) -> list[torch.Tensor]:
    """megatron [G * (q_per_group + 2) * head_dim, ...] -> q, k, v as stacked heads."""
    rest = t.shape[1:]
    grouped = t.reshape(groups, (q_per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([q_per_group * head_dim, head_dim, head_dim], dim=1)
    return [x.reshape(-1, *rest) for x in (q, k, v)]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    rest = q.shape[1:]
    parts = [x.reshape(groups, -1, *rest) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


@dataclass
class Rule:
    """One megatron tensor <-> one or more HF tensors."""

    pattern: str  # regex over the megatron name, with named groups used by `hf`
    hf: list[str]  # HF name templates ({i}, {e}, {p}, {rest} from the pattern)
    split: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
    merge: Callable[..., torch.Tensor] | None = None


def _halves(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t.chunk(2, dim=0))


def _cat(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=0)


class NameMap:
    """Tensor names and conversions for one config. `vision_prefix`/`llm_prefix` say where the
    vision tower and the LLM sit in the HF folder (None: that part is not in it); `connector`
    whether the folder holds the connector (only MM1 folders do)."""

    def __init__(self, cfg: Config, vision_prefix: str | None, llm_prefix: str | None, connector: bool):
        self.cfg = cfg
        self.vision_prefix, self.llm_prefix = vision_prefix, llm_prefix
        v, llm = cfg.model.vision, cfg.model.llm
        vhd = v.hidden_size // v.num_attention_heads
        hd = llm.hidden_size // llm.num_attention_heads
        q_per_group = llm.num_attention_heads // llm.num_query_groups
        groups = llm.num_query_groups
        # The ViT has one k/v head per query head: a group is [q, k, v] of one head.
        vheads = v.num_attention_heads
        self.rules: list[Rule] = []
        if vision_prefix is not None:
            V, VL = vision_prefix, vision_prefix + "encoder.layers.{i}."
            layer = r"vision\.transformer\.layers\.(?P<i>\d+)\."
            self.rules += [
                Rule(r"vision\.conv1\.weight", [V + "embeddings.patch_embedding.weight"]),
                Rule(r"vision\.class_embedding", [V + "embeddings.class_embedding"]),
                Rule(r"vision\.position_embedding", [V + "embeddings.position_embedding.weight"]),
                Rule(r"vision\.ln_pre\.(?P<p>weight|bias)", [V + "pre_layrnorm.{p}"]),
                Rule(layer + r"input_layernorm\.(?P<p>weight|bias)", [VL + "layer_norm1.{p}"]),
                Rule(
                    layer + r"self_attention\.linear_qkv\.(?P<p>weight|bias)",
                    [VL + "self_attn.q_proj.{p}", VL + "self_attn.k_proj.{p}", VL + "self_attn.v_proj.{p}"],
                    split=lambda t: split_qkv(t, vheads, 1, vhd),
                    merge=lambda q, k, v: merge_qkv(q, k, v, vheads),
                ),
                Rule(layer + r"self_attention\.linear_proj\.(?P<p>weight|bias)", [VL + "self_attn.out_proj.{p}"]),
                Rule(layer + r"pre_mlp_layernorm\.(?P<p>weight|bias)", [VL + "layer_norm2.{p}"]),
                Rule(layer + r"mlp\.linear_fc1\.(?P<p>weight|bias)", [VL + "mlp.fc1.{p}"]),
                Rule(layer + r"mlp\.linear_fc2\.(?P<p>weight|bias)", [VL + "mlp.fc2.{p}"]),
            ]
        if connector:
            # The connector is MM1's own: same module names on both sides.
            self.rules.append(Rule(r"connector\.(?P<rest>.+)", ["connector.{rest}"]))
        if llm_prefix is not None:
            L, LL = llm_prefix, llm_prefix + "model.layers.{i}."
            layer = r"llm\.decoder\.layers\.(?P<i>\d+)\."
            expert = layer + r"mlp\.experts\.local_experts\.(?P<e>\d+)\."
            self.rules += [
                Rule(r"llm\.embedding\.word_embeddings\.weight", [L + "model.embed_tokens.weight"]),
                Rule(layer + r"input_layernorm\.weight", [LL + "input_layernorm.weight"]),
                Rule(
                    layer + r"self_attention\.linear_qkv\.weight",
                    [LL + "self_attn.q_proj.weight", LL + "self_attn.k_proj.weight", LL + "self_attn.v_proj.weight"],
                    split=lambda t: split_qkv(t, groups, q_per_group, hd),
                    merge=lambda q, k, v: merge_qkv(q, k, v, groups),
                ),
                Rule(layer + r"self_attention\.q_layernorm\.weight", [LL + "self_attn.q_norm.weight"]),
                Rule(layer + r"self_attention\.k_layernorm\.weight", [LL + "self_attn.k_norm.weight"]),
                Rule(layer + r"self_attention\.linear_proj\.weight", [LL + "self_attn.o_proj.weight"]),
                Rule(layer + r"pre_mlp_layernorm\.weight", [LL + "post_attention_layernorm.weight"]),
                Rule(
                    layer + r"mlp\.linear_fc1\.weight",
                    [LL + "mlp.gate_proj.weight", LL + "mlp.up_proj.weight"],
                    split=_halves, merge=_cat,
                ),
                Rule(layer + r"mlp\.linear_fc2\.weight", [LL + "mlp.down_proj.weight"]),
                Rule(layer + r"mlp\.router\.weight", [LL + "mlp.gate.weight"]),
                Rule(
                    expert + r"linear_fc1\.weight",
                    [LL + "mlp.experts.{e}.gate_proj.weight", LL + "mlp.experts.{e}.up_proj.weight"],
                    split=_halves, merge=_cat,
                ),
                Rule(expert + r"linear_fc2\.weight", [LL + "mlp.experts.{e}.down_proj.weight"]),
                Rule(r"llm\.decoder\.final_layernorm\.weight", [L + "model.norm.weight"]),
                Rule(r"llm\.output_layer\.weight", [L + "lm_head.weight"]),
            ]

    def _match(self, name: str) -> tuple[Rule, list[str]] | None:
        for rule in self.rules:
            m = re.fullmatch(rule.pattern, name)
            if m:
                return rule, [h.format(**m.groupdict()) for h in rule.hf]
        return None

    def covers(self, name: str) -> bool:
        """Whether this map converts megatron tensor `name` (its part is in the HF folder)."""
        return self._match(name) is not None

    def hf_names(self, name: str) -> list[str]:
        found = self._match(name)
        if found is None:
            raise ConfigError(f"no Hugging Face name for megatron tensor {name}")
        return found[1]

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        rule, names = self._match(name)
        parts = rule.split(tensor) if rule.split else [tensor]
        return dict(zip(names, parts))

    def from_hf(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        rule, _ = self._match(name)
        return rule.merge(*tensors) if rule.merge else tensors[0]

    def extras(self, group: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """HF-only tensors of a group that MM1 does not use, written so that transformers loads
        the folder without missing weights; `from-hf` ignores them."""
        out: dict[str, torch.Tensor] = {}
        if group == "vision.embeddings" and self.vision_prefix is not None:
            # CLIPVisionModel's final LayerNorm only feeds the pooled output, which MM1 never
            # reads (it takes hidden_states[feature_layer]): an identity LayerNorm.
            w = self.cfg.model.vision.hidden_size
            out[self.vision_prefix + "post_layernorm.weight"] = torch.ones(w, dtype=dtype)
            out[self.vision_prefix + "post_layernorm.bias"] = torch.zeros(w, dtype=dtype)
        m = re.fullmatch(r"llm\.decoder\.layers\.(\d+)", group)
        if m and self.llm_prefix is not None and text_model_type(self.cfg) == "qwen2_moe":
            i, h = int(m.group(1)), self.cfg.model.llm.hidden_size
            if i in moe_layers(self.cfg):
                # Qwen2-MoE always has a gated shared expert; with zero width its output is
                # exactly zero, so the block equals megatron's routed experts alone.
                p = f"{self.llm_prefix}model.layers.{i}.mlp."
                out[p + "shared_expert.gate_proj.weight"] = torch.zeros(0, h, dtype=dtype)
                out[p + "shared_expert.up_proj.weight"] = torch.zeros(0, h, dtype=dtype)
                out[p + "shared_expert.down_proj.weight"] = torch.zeros(h, 0, dtype=dtype)
                out[p + "shared_expert_gate.weight"] = torch.zeros(1, h, dtype=dtype)
        return out


# ----------------------------------------------------------------------------- configs


def moe_layers(cfg: Config) -> list[int]:
    moe = cfg.model.moe
    if not moe.num_experts:
        return []
    return [i for i in range(cfg.model.llm.num_layers) if i % moe.layer_freq == 0]


def text_model_type(cfg: Config) -> str:
    """The native transformers family that computes exactly what our decoder computes."""
    moe, qk = bool(cfg.model.moe.num_experts), cfg.model.llm.qk_layernorm
    if moe:
        # Qwen3-MoE always has QK-norm; Qwen2-MoE never does (and its shared expert is zeroed).
        return "qwen3_moe" if qk else "qwen2_moe"
    return "qwen3" if qk else "llama"


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def text_config(cfg: Config) -> dict:
    """The LLM as a native transformers config (a dict with model_type)."""
    llm, moe = cfg.model.llm, cfg.model.moe
    if moe.num_experts and moe.capacity_factor is not None:
        raise ConfigError(
            "model.moe.capacity_factor is set: megatron drops tokens over capacity, which no "
            "transformers MoE class reproduces; only dropless MoE models convert"
        )
    model_type = text_model_type(cfg)
    out = dict(
        model_type=model_type,
        architectures=[ARCHITECTURES[model_type]],
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups,
        head_dim=llm.hidden_size // llm.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=llm.max_sequence_length,
        rms_norm_eps=llm.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(llm.rotary_base)},
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type in ("qwen3", "qwen3_moe"):
        out.update(attention_bias=False, use_sliding_window=False)
    if moe.num_experts:
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
            out.update(qkv_bias=False, shared_expert_intermediate_size=0, use_sliding_window=False)
    return out


def vision_config(cfg: Config) -> dict:
    """The encoder as a transformers CLIPVisionConfig dict, with only the layers MM1 runs."""
    v = cfg.model.vision
    return dict(
        model_type="clip_vision_model",
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers_used,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=v.layernorm_epsilon,
        attention_dropout=0.0,
    )


def _require(ok: bool, what: str, errors: list[str]) -> None:
    if not ok:
        errors.append(what)


def llm_fields_from_hf(hf: dict) -> dict:
    """model.llm and model.moe fields from a native causal-LM config.json (raises ConfigError
    for a model MM1's decoder cannot represent exactly)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"unsupported language model type '{model_type}': MM1 imports "
            f"{', '.join(sorted(ARCHITECTURES))} (a Llama-style decoder without biases)"
        )
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    errors: list[str] = []
    _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')} (need silu)", errors)
    _require(not hf.get("attention_bias", False), "attention_bias=true (MM1 has no biases)", errors)
    _require(not hf.get("qkv_bias", False), "qkv_bias=true (MM1 has no biases)", errors)
    _require(not hf.get("mlp_bias", False), "mlp_bias=true (MM1 has no biases)", errors)
    _require(hf.get("head_dim") in (None, h // heads), f"head_dim={hf.get('head_dim')} != hidden_size/heads", errors)
    _require(rope.get("rope_type", "default") == "default", f"rope_type={rope.get('rope_type')} (need default)", errors)
    theta = float(rope["rope_theta"])
    _require(theta.is_integer(), f"rope_theta={theta} is not an integer (model.llm.rotary_base is)", errors)
    llm = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=h,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf["max_position_embeddings"],
        rotary_base=int(theta),
        norm_epsilon=hf["rms_norm_eps"],
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
    )
    moe = dict(num_experts=0)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        n = hf["num_hidden_layers"]
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        sparse = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
        freq = sparse[1] - sparse[0] if len(sparse) > 1 else n
        _require(
            bool(sparse) and sparse == list(range(0, n, freq)),
            f"MoE layers {sparse}: MM1 puts an MoE FFN every k layers starting with layer 0",
            errors,
        )
        _require(hf.get("norm_topk_prob", False), "norm_topk_prob=false (megatron's router renormalises the top k)", errors)
        _require(
            hf.get("shared_expert_intermediate_size", 0) == 0,
            "a shared expert (shared_expert_intermediate_size > 0) has no MM1 counterpart",
            errors,
        )
        moe = dict(
            num_experts=hf["num_experts"],
            layer_freq=freq,
            router_topk=hf["num_experts_per_tok"],
            ffn_hidden_size=hf["moe_intermediate_size"],
        )
    if errors:
        raise ConfigError(f"cannot import this {model_type} model exactly:\n  - " + "\n  - ".join(errors))
    return {"llm": llm, "moe": moe}


def vision_fields_from_hf(clip: dict) -> dict:
    """model.vision fields from a CLIP config.json (CLIPVisionModel's, or CLIPModel's vision_config)."""
    if clip.get("model_type") == "clip":
        clip = clip.get("vision_config") or {}
    if clip.get("model_type") != "clip_vision_model":
        raise ConfigError(
            f"--vision: expected a CLIP vision folder (model_type clip_vision_model or clip), "
            f"got model_type={clip.get('model_type')}"
        )
    if clip.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ConfigError(f"--vision: hidden_act={clip['hidden_act']}; MM1's ViT uses quick_gelu")
    return dict(
        image_size=clip["image_size"],
        patch_size=clip["patch_size"],
        hidden_size=clip["hidden_size"],
        num_layers=clip["num_hidden_layers"],
        num_attention_heads=clip["num_attention_heads"],
        ffn_hidden_size=clip["intermediate_size"],
        layernorm_epsilon=clip.get("layer_norm_eps", 1e-5),
    )
