"""Names, layouts and configs between megatron_mm1 and Hugging Face transformers.

Megatron names are those of one MM1Model built in one process (TP = PP = EP = 1), e.g.
`llm.decoder.layers.3.self_attention.linear_qkv.weight`; dist_checkpointing maps every saved
layout onto them. Hugging Face names are those of:

- the vision tower: transformers' `CLIPVisionModel`, `SiglipVisionModel` or `Siglip2VisionModel`
  (`<vision prefix>embeddings...`, the same layer names in all three);
- the connector: `modeling_mm1.py`'s modules, named as in megatron_mm1 (`connector.*`);
- the LLM: a native causal LM (`<llm prefix>model.layers.3.self_attn.q_proj.weight`) of one
  of hf_config.FAMILIES; MoE layers are named as the family names them (Mixtral:
  `block_sparse_moe.experts.{e}.w1`, the others `mlp.experts.{e}.gate_proj`).

Two fused megatron tensors are split:
- `linear_qkv` rows are grouped by query group: for each of the G groups, its q heads, then
  one k head, then one v head (megatron SelfAttention.get_query_key_value_tensors);
- `linear_fc1` of a SwiGLU MLP is [gate; up] stacked along the rows.

The word embeddings and the output layer have `model.llm.padded_vocab_size` rows in megatron,
`vocab_size` in Hugging Face: the padding is dropped on export and zero on import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_mm1.config import Config, ConfigError
from megatron_mm1.hf.hf_config import moe_layers, text_model_type, vision_hf_model_type

# Where each part lives in an exported MM1 folder (modeling_mm1.MM1ForConditionalGeneration).
MM1_VISION_PREFIX = "vision_tower.vision_model."
MM1_LLM_PREFIX = "language_model."
# transformers' vision models (CLIPVisionModel, SiglipVisionModel...) and the composite ones
# (CLIPModel, SiglipModel...) keep the tower under `vision_model.`.
COMPOSITE_VISION_PREFIX = "vision_model."


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
        hd = llm.head_dim
        q_per_group = llm.num_attention_heads // llm.num_query_groups
        groups = llm.num_query_groups
        # The ViT has one k/v head per query head: a group is [q, k, v] of one head.
        vheads = v.num_attention_heads
        self.rules: list[Rule] = []
        if vision_prefix is not None:
            V, VL = vision_prefix, vision_prefix + "encoder.layers.{i}."
            layer = r"vision\.transformer\.layers\.(?P<i>\d+)\."
            self.rules += [
                Rule(r"vision\.position_embedding", [V + "embeddings.position_embedding.weight"]),
                Rule(r"vision\.conv1\.bias", [V + "embeddings.patch_embedding.bias"]),  # SigLIP's
                Rule(r"vision\.class_embedding", [V + "embeddings.class_embedding"]),  # CLIP's
                Rule(r"vision\.ln_pre\.(?P<p>weight|bias)", [V + "pre_layrnorm.{p}"]),  # CLIP's
            ]
            if vision_hf_model_type(cfg) == "siglip2_vision_model":
                # SigLIP2 embeds patches flattened as (row, column, channel) with a Linear.
                patch, width = v.patch_size, v.hidden_size
                self.rules.append(Rule(
                    r"vision\.conv1\.weight", [V + "embeddings.patch_embedding.weight"],
                    split=lambda t: [t.permute(0, 2, 3, 1).reshape(width, -1).contiguous()],
                    merge=lambda t: t.reshape(width, patch, patch, 3).permute(0, 3, 1, 2).contiguous(),
                ))
            else:
                self.rules.append(Rule(r"vision\.conv1\.weight", [V + "embeddings.patch_embedding.weight"]))
            self.rules += [
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
        # HF tensors that MM1 does not read, each with the reason; any other unread tensor of a
        # source folder refuses the import.
        self.unused_patterns: list[tuple[str, str]] = []
        self.vision_layers_used = 0
        if vision_prefix is not None:
            V = re.escape(vision_prefix)
            self.unused_patterns += [
                (V + r"post_layernorm\.(weight|bias)", "the final LayerNorm feeds only the pooled output"),
                (V + r"head\..+", "SigLIP's attention-pooling head feeds only the pooled output"),
                (V + r"embeddings\.position_ids", "a constant buffer"),
                # (only layers from `late` on: see `unused`)
                (V + r"encoder\.layers\.(?P<late>\d+)\..+", "layers after model.vision.feature_layer are not run"),
            ]
            self.vision_layers_used = v.num_layers_used
            if vision_prefix == COMPOSITE_VISION_PREFIX:  # a CLIPModel or SiglipModel folder: its text side
                self.unused_patterns += [
                    (r"text_model\..+|visual_projection\.weight|text_projection\.weight|logit_scale|logit_bias",
                     "the text tower and projections"),
                ]
        if connector:
            # The connector is MM1's own: same module names on both sides.
            self.rules.append(Rule(r"connector\.(?P<rest>.+)", ["connector.{rest}"]))
        if llm_prefix is not None:
            L, LL = llm_prefix, llm_prefix + "model.layers.{i}."
            layer = r"llm\.decoder\.layers\.(?P<i>\d+)\."
            expert = layer + r"mlp\.experts\.local_experts\.(?P<e>\d+)\."
            if text_model_type(cfg) == "mixtral":
                router, gate, up, down = "block_sparse_moe.gate", "w1", "w3", "w2"
                experts = LL + "block_sparse_moe.experts.{e}."
            else:
                router, gate, up, down = "mlp.gate", "gate_proj", "up_proj", "down_proj"
                experts = LL + "mlp.experts.{e}."
            # megatron's rows from vocab_size on are padding (never looked up, logits -inf):
            # exported without them, imported as zeros.
            vocab, padded = llm.vocab_size, llm.padded_vocab_size
            unpad = {} if padded == vocab else dict(
                split=lambda t: [t[:vocab]], merge=lambda t: torch.cat([t, t.new_zeros(padded - vocab, *t.shape[1:])])
            )
            self.rules += [
                Rule(r"llm\.embedding\.word_embeddings\.weight", [L + "model.embed_tokens.weight"], **unpad),
                Rule(layer + r"input_layernorm\.weight", [LL + "input_layernorm.weight"]),
                Rule(
                    layer + r"self_attention\.linear_qkv\.(?P<p>weight|bias)",
                    [LL + "self_attn.q_proj.{p}", LL + "self_attn.k_proj.{p}", LL + "self_attn.v_proj.{p}"],
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
                Rule(layer + r"mlp\.router\.weight", [LL + router + ".weight"]),
                Rule(
                    expert + r"linear_fc1\.weight",
                    [experts + gate + ".weight", experts + up + ".weight"],
                    split=_halves, merge=_cat,
                ),
                Rule(expert + r"linear_fc2\.weight", [experts + down + ".weight"]),
                Rule(r"llm\.decoder\.final_layernorm\.weight", [L + "model.norm.weight"]),
                Rule(r"llm\.output_layer\.weight", [L + "lm_head.weight"], **unpad),
            ]
            any_layer = re.escape(llm_prefix) + r"model\.layers\.\d+\."
            self.unused_patterns.append((any_layer + r"self_attn\.rotary_emb\.inv_freq", "recomputed from the config"))
            if llm.tie_embeddings:
                self.unused_patterns.append(
                    (re.escape(llm_prefix) + r"lm_head\.weight", "tied embeddings: transformers reads embed_tokens")
                )
            if text_model_type(cfg) == "qwen2_moe":
                self.unused_patterns.append(
                    (any_layer + r"mlp\.shared_expert(\..+|_gate\.weight)", "a zero-width shared expert adds exactly 0")
                )

    def unused(self, hf_name: str) -> str | None:
        """Why a tensor of the HF folder is, by design, not read (None: it must be)."""
        for pattern, why in self.unused_patterns:
            m = re.fullmatch(pattern, hf_name)
            if m and int(m.groupdict().get("late") or self.vision_layers_used) >= self.vision_layers_used:
                return why
        return None

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
            # The vision model's final LayerNorm only feeds the pooled output, which MM1 never
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
