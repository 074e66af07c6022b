"""CLIP ViT image encoder on megatron-core transformer layers (tensor parallel)."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mm1.config import VisionConfig
from megatron_mm1.models.specs import TorchNorm, vision_layer_spec


class VisionEncoder(MegatronModule):
    """Patch embedding + class token + position embedding, pre-LN, then the ViT layers.

    Returns the patch features of `vision.feature_layer` ([num_images, num_patches, width]) with
    the class token dropped, as the connector expects. `config.num_layers` is the number of
    layers actually run (up to the feature layer); later layers are not built.
    """

    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: str = "local") -> None:
        super().__init__(config=config)
        width = config.hidden_size
        self.patch_size = vision.patch_size
        self.num_patches = vision.num_patches
        dtype = config.params_dtype
        self.conv1 = torch.nn.Conv2d(3, width, vision.patch_size, vision.patch_size, bias=False, dtype=dtype)
        self.class_embedding = torch.nn.Parameter(torch.empty(width, dtype=dtype))
        self.position_embedding = torch.nn.Parameter(torch.empty(self.num_patches + 1, width, dtype=dtype))
        with torch.no_grad():
            config.init_method(self.class_embedding)
            config.init_method(self.position_embedding)
        self.ln_pre = TorchNorm(config, width, eps=config.layernorm_epsilon)
        self.transformer = TransformerBlock(
            config=config, spec=vision_layer_spec(layer_spec), pre_process=True, post_process=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [n, w, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, g*g, w]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding
        x = self.ln_pre(x)
        x = x.transpose(0, 1).contiguous()  # megatron layers take [s, b, h]
        x = self.transformer(x, attention_mask=None)
        return x[1:].transpose(0, 1).contiguous()  # drop CLS -> [n, g*g, w]
