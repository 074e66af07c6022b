"""MM1 for Hugging Face transformers: vision tower -> connector -> native causal LM.

    images [n, 3, S, S] -> CLIPVisionModel, SiglipVisionModel or Siglip2VisionModel
                        -> hidden_states[vision_feature_layer], CLIP's class token dropped
                        -> connector (C-Abstractor)  -> image tokens [n, N, d_text]
    prompt ids (each image = N consecutive <image> ids) -> the LM's input embeddings, with the
    image tokens written over the <image> positions in row-major order -> the causal LM

The vision tower and the language model are transformers' own classes; only the connector is
defined here, module for module as in megatron_mm1 (models/connector.py) so weights keep their
names. Written by `mm1 convert to-hf`; needs only torch and transformers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_mm1 import MM1Config

# ----------------------------------------------------------------------------- connectors


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNorm(nn.Sequential):
    """Convolution without bias, LayerNorm2d, optional SiLU."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, act: bool = True):
        layers = [
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
            LayerNorm2d(cout),
        ]
        super().__init__(*layers, *([nn.SiLU()] if act else []))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class RegBottleneck(nn.Module):
    """RegNetY block (bottle ratio 1, depthwise 3x3, squeeze-excitation 0.25)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = ConvNorm(cin, cout, 1)
        self.conv2 = ConvNorm(cout, cout, 3, groups=cout)
        self.se = SqueezeExcite(cout, int(round(cin * 0.25)))
        self.conv3 = ConvNorm(cout, cout, 1, act=False)
        self.downsample = ConvNorm(cin, cout, 1, act=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.downsample(x))


def reg_stage(depth: int, cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*(RegBottleneck(cin if i == 0 else cout, cout) for i in range(depth)))


def readout(cin: int, cout: int, depth: int) -> nn.Sequential:
    layers = [nn.Linear(cin, cout)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(cout, cout)]
    return nn.Sequential(*layers)


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: position embedding, RegStage, adaptive average pooling to a
    sqrt(N) x sqrt(N) grid, RegStage, MLP readout."""

    def __init__(self, config: MM1Config, num_patches: int, vision_width: int, text_width: int):
        super().__init__()
        self.grid = math.isqrt(num_patches)
        self.pos_emb = nn.Parameter(torch.zeros(1, num_patches, vision_width))
        self.stage1 = reg_stage(config.connector_depth, vision_width, config.connector_hidden_size)
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(config.num_image_tokens))
        self.stage2 = reg_stage(
            config.connector_depth, config.connector_hidden_size, config.connector_hidden_size
        )
        self.readout = readout(config.connector_hidden_size, text_width, config.connector_mlp_depth)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, p, c = feats.shape
        x = (feats + self.pos_emb).transpose(1, 2).reshape(n, c, self.grid, self.grid)
        x = self.stage2(self.pool(self.stage1(x)))
        return self.readout(x.flatten(2).transpose(1, 2))


class AvgPoolConnector(nn.Module):
    """Average-pool the patch grid to sqrt(N) x sqrt(N), then a linear projection."""

    def __init__(self, config: MM1Config, num_patches: int, vision_width: int, text_width: int):
        super().__init__()
        self.grid = math.isqrt(num_patches)
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(config.num_image_tokens))
        self.proj = nn.Linear(vision_width, text_width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, p, c = feats.shape
        x = self.pool(feats.transpose(1, 2).reshape(n, c, self.grid, self.grid))
        return self.proj(x.flatten(2).transpose(1, 2))


class AttnPoolConnector(nn.Module):
    """N learnable queries cross-attend to the patches, then a linear projection."""

    def __init__(self, config: MM1Config, num_patches: int, vision_width: int, text_width: int):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(config.num_image_tokens, vision_width))
        self.attn = nn.MultiheadAttention(vision_width, max(1, vision_width // 64), batch_first=True)
        self.norm = nn.LayerNorm(vision_width)
        self.proj = nn.Linear(vision_width, text_width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(feats.shape[0], -1, -1)
        x, _ = self.attn(q, feats, feats, need_weights=False)
        return self.proj(self.norm(x))


CONNECTORS = {"c-abstractor": CAbstractor, "avg-pool": AvgPoolConnector, "attn-pool": AttnPoolConnector}


# ----------------------------------------------------------------------------- the model


class MM1PreTrainedModel(PreTrainedModel):
    config_class = MM1Config
    config: MM1Config
    base_model_prefix = "mm1"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The connector's free parameters (for a model built from its config alone).
        if isinstance(module, CAbstractor):
            nn.init.trunc_normal_(module.pos_emb, std=0.02)
        elif isinstance(module, AttnPoolConnector):
            nn.init.trunc_normal_(module.queries, std=0.02)


def siglip2_inputs(pixel_values: torch.Tensor, patch: int) -> dict:
    """Siglip2VisionModel's input for square images: every image one full grid of patches,
    each flattened as (row, column, channel) like Siglip2ImageProcessor's."""
    n, c, h, w = pixel_values.shape
    rows, cols = h // patch, w // patch
    patches = pixel_values[:, :, : rows * patch, : cols * patch].reshape(n, c, rows, patch, cols, patch)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(n, rows * cols, patch * patch * c)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(n, rows * cols, dtype=torch.long, device=patches.device),
        "spatial_shapes": torch.tensor([[rows, cols]] * n, device=patches.device),
    }


class MM1ForConditionalGeneration(MM1PreTrainedModel, GenerationMixin):
    """MM1: `forward(input_ids, pixel_values, ...)` returns the causal LM's output; `generate`
    works as for the LM, with `pixel_values` used on the prompt (prefill) only."""

    def __init__(self, config: MM1Config):
        super().__init__(config)
        vision = config.vision_config
        if vision.model_type == "siglip2_vision_model":
            num_patches = vision.num_patches
        else:
            num_patches = (vision.image_size // vision.patch_size) ** 2
        self.vision_tower = AutoModel.from_config(vision)
        self.connector = CONNECTORS[config.connector_type](
            config, num_patches, vision.hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens [n, N, d_text] for preprocessed images [n, 3, S, S]."""
        vision = self.config.vision_config
        inputs = {"pixel_values": pixel_values.to(self.vision_tower.dtype)}
        if vision.model_type == "siglip2_vision_model":
            inputs = siglip2_inputs(inputs["pixel_values"], vision.patch_size)
        out = self.vision_tower(**inputs, output_hidden_states=True)
        patches = out.hidden_states[self.config.vision_feature_layer]
        if vision.model_type == "clip_vision_model":
            patches = patches[:, 1:]  # drop the class token
        return self.connector(patches)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image tokens written over the `<image>` positions."""
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        if pixel_values is None or pixel_values.shape[0] == 0:
            if is_image.any():
                raise ValueError(f"{int(is_image.sum())} <image> tokens in the prompt but no pixel_values")
            return embeds
        image_tokens = self.get_image_features(pixel_values)
        needed = image_tokens.shape[0] * image_tokens.shape[1]
        if int(is_image.sum()) != needed:
            raise ValueError(
                f"{pixel_values.shape[0]} images need {needed} <image> tokens "
                f"({self.config.num_image_tokens} each) but the prompt has {int(is_image.sum())}"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_tokens.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


__all__ = ["MM1ForConditionalGeneration", "MM1PreTrainedModel"]
