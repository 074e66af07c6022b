"""ViT image encoder on megatron-core transformer layers (tensor parallel): CLIP's or SigLIP's."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mm1.config import VisionConfig
from megatron_mm1.models.specs import TorchNorm, vision_layer_spec


class VisionEncoder(MegatronModule):
    """Patch embedding + position embedding, then the ViT layers. CLIP (`arch: clip`) adds a
    class token before the position embedding and a LayerNorm after it; SigLIP has neither,
    and a bias on the patch convolution.

    Returns the patch features of `vision.feature_layer` ([num_images, num_patches, width]),
    without the class token, as the connector expects. `config.num_layers` is the number of
    layers actually run (up to the feature layer); later layers are not built.
    """

    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: str = "local") -> None:
        super().__init__(config=config)
        width = config.hidden_size
        clip = vision.arch == "clip"
        dtype = config.params_dtype
        self.conv1 = torch.nn.Conv2d(3, width, vision.patch_size, vision.patch_size, bias=not clip, dtype=dtype)
        self.class_embedding = torch.nn.Parameter(torch.empty(width, dtype=dtype)) if clip else None
        self.position_embedding = torch.nn.Parameter(torch.empty(vision.sequence_length, width, dtype=dtype))
        with torch.no_grad():
            for p in (self.class_embedding, self.position_embedding):
                if p is not None:
                    config.init_method(p)
        self.ln_pre = TorchNorm(config, width, eps=config.layernorm_epsilon) if clip else None
        self.transformer = TransformerBlock(
            config=config, spec=vision_layer_spec(layer_spec), pre_process=True, post_process=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [n, w, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, g*g, w]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.position_embedding
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = x.transpose(0, 1).contiguous()  # megatron layers take [s, b, h]
        x = self.transformer(x, attention_mask=None)
        first_patch = int(self.class_embedding is not None)
        return x[first_patch:].transpose(0, 1).contiguous()  # -> [n, g*g, w]
