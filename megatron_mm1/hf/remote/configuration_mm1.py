"""MM1 configuration for Hugging Face transformers (written next to an exported checkpoint).

An MM1 model is a vision tower (transformers' `CLIPVisionModel`, `SiglipVisionModel` or
`Siglip2VisionModel`), a vision-language connector (defined in `modeling_mm1.py`) and a native
transformers causal LM (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE or Qwen3-MoE). This file
is self-contained: it needs only transformers.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MM1Config(PreTrainedConfig):
    r"""
    Args:
        vision_config: a `CLIPVisionConfig`, `SiglipVisionConfig` or `Siglip2VisionConfig` (or its
            dict, with model_type). Only the encoder layers up to the
            feature layer are stored, so `vision_feature_layer` is usually -1.
        text_config: the config of a native causal LM (its dict carries `model_type`).
        connector_type: `c-abstractor` (MM1's), `avg-pool` or `attn-pool`.
        num_image_tokens: image tokens per image N; each image fills N consecutive
            `<image>` tokens (`image_token_id`) of the prompt.
        connector_hidden_size, connector_depth, connector_mlp_depth: C-Abstractor shape
            (RegNet width, blocks per stage, readout layers).
        vision_feature_layer: which hidden state of the vision tower feeds the connector
            (index into `hidden_states`; -1 the last stored layer). CLIP's class token is dropped.
        image_token_id: the `<image>` placeholder id.
        mm1_config: the megatron_mm1 training config the weights came from, so that
            `mm1 convert from-hf` can rebuild the same model; not used by transformers.
    """

    model_type = "mm1"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    connector_type: str = "c-abstractor"
    num_image_tokens: int = 144
    connector_hidden_size: int = 1024
    connector_depth: int = 3
    connector_mlp_depth: int = 2
    vision_feature_layer: int = -1
    image_token_id: int = 4
    mm1_config: dict | None = None
    tie_word_embeddings: bool = False


__all__ = ["MM1Config"]
