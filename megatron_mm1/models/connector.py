"""Vision-language connectors: MM1's C-Abstractor and its two ablation connectors.

All map encoder patch features [n, P, C] to N image tokens [n, N, llm_width]. They are small
(~20M parameters for MM1) and replicated across tensor-parallel ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mm1.config import ConnectorConfig


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNorm(nn.Sequential):
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
    """A RegNetY block as timm builds it for Honeybee (bottle ratio 1, depthwise 3x3, SE 0.25)."""

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
    layers: list[nn.Module] = [nn.Linear(cin, cout)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(cout, cout)]
    return nn.Sequential(*layers)


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: pos-emb, RegStage, adaptive avg-pool to sqrt(N)^2, RegStage, MLP."""

    def __init__(self, cfg: ConnectorConfig, num_patches: int, vision_width: int, llm_width: int):
        super().__init__()
        self.grid = math.isqrt(num_patches)
        self.side = math.isqrt(cfg.num_image_tokens)
        self.pos_emb = nn.Parameter(torch.empty(1, num_patches, vision_width))
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.stage1 = reg_stage(cfg.depth, vision_width, cfg.hidden_size)
        self.pool = nn.AdaptiveAvgPool2d(self.side)
        self.stage2 = reg_stage(cfg.depth, cfg.hidden_size, cfg.hidden_size)
        self.readout = readout(cfg.hidden_size, llm_width, cfg.mlp_depth)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, p, c = feats.shape
        x = (feats + self.pos_emb).transpose(1, 2).reshape(n, c, self.grid, self.grid)
        x = self.stage2(self.pool(self.stage1(x)))
        return self.readout(x.flatten(2).transpose(1, 2))


class AvgPoolConnector(nn.Module):
    """MM1 ablation: average-pool the patch grid to sqrt(N)^2, then a linear projection."""

    def __init__(self, cfg: ConnectorConfig, num_patches: int, vision_width: int, llm_width: int):
        super().__init__()
        self.grid = math.isqrt(num_patches)
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(cfg.num_image_tokens))
        self.proj = nn.Linear(vision_width, llm_width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, p, c = feats.shape
        x = self.pool(feats.transpose(1, 2).reshape(n, c, self.grid, self.grid))
        return self.proj(x.flatten(2).transpose(1, 2))


class AttnPoolConnector(nn.Module):
    """MM1 ablation: N learnable queries cross-attend to the patches, then a linear projection."""

    def __init__(self, cfg: ConnectorConfig, num_patches: int, vision_width: int, llm_width: int):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(cfg.num_image_tokens, vision_width))
        nn.init.trunc_normal_(self.queries, std=0.02)
        heads = max(1, vision_width // 64)
        self.attn = nn.MultiheadAttention(vision_width, heads, batch_first=True)
        self.norm = nn.LayerNorm(vision_width)
        self.proj = nn.Linear(vision_width, llm_width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(feats.shape[0], -1, -1)
        x, _ = self.attn(q, feats, feats, need_weights=False)
        return self.proj(self.norm(x))


CONNECTORS = {"c-abstractor": CAbstractor, "avg-pool": AvgPoolConnector, "attn-pool": AttnPoolConnector}


def build_connector(
    cfg: ConnectorConfig, num_patches: int, vision_width: int, llm_width: int
) -> nn.Module:
    return CONNECTORS[cfg.type](cfg, num_patches, vision_width, llm_width)
