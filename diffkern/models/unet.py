"""A small time-conditioned UNet for 8x8 .. 32x32 images (the DDPM architecture, shrunk).

Residual blocks with GroupNorm and SiLU; the timestep enters every block through a
sinusoidal embedding and an MLP; optional class conditioning adds a label embedding to
it (index ``num_classes`` is the "no label" token used for classifier-free dropout). No
attention: at these resolutions convolutions already see most of the image.
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import sinusoidal_embedding

__all__ = ["UNet", "ResidualBlock"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # GroupNorm needs groups | channels; fall back to the largest divisor not above `groups`.
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class ResidualBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))) + emb))))`` with a 1x1 skip when channels change.
    The second conv starts at zero so each block begins as the identity (stable early training)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, *, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.embed(emb)[:, :, None, None]
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """Epsilon-prediction UNet ``model(x, t, y=None) -> eps`` for (B, C, H, W) images.

    Args:
        in_channels: image channels C (output has the same unless ``out_channels`` is given).
        base_channels: width of the first level; level i has ``base_channels * channel_mults[i]``.
        channel_mults: one entry per resolution; H and W must be divisible by
            ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        num_classes: enables class conditioning; ``y`` is then (B,) int64 in
            ``[0, num_classes]``, where ``num_classes`` (or ``y=None``) means unconditional.
        groups: GroupNorm groups. dropout: inside residual blocks.

    The defaults (32, (1, 2, 2), 2 blocks) give about 1.3M parameters; ``base_channels=16``
    about 0.33M, ``base_channels=24`` about 0.75M. ``t`` is an int or (B,) int64 tensor; it
    is embedded as a float, so fractional times work as well.
    """

    def __init__(self, in_channels: int = 1, *, out_channels: int | None = None, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 2, num_classes: int | None = None,
                 groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           channel_mults=tuple(channel_mults), num_res_blocks=num_res_blocks, num_classes=num_classes,
                           groups=groups, dropout=dropout)
        out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.num_classes = num_classes
        self.downsample_factor = 2 ** (len(channel_mults) - 1)
        embed_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None

        block = dict(embed_dim=embed_dim, groups=groups, dropout=dropout)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResidualBlock(ch, base_channels * mult, **block))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
        self.mid = nn.ModuleList([ResidualBlock(ch, ch, **block), ResidualBlock(ch, ch, **block)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResidualBlock(ch + skip_channels.pop(), base_channels * mult, **block))
                ch = base_channels * mult
            if level > 0:
                upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                self.up.append(upsample)
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def from_config(cls, config: dict) -> UNet:
        return cls(**config)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        if H % self.downsample_factor or W % self.downsample_factor:
            raise ValueError(f"image size {H}x{W} must be divisible by {self.downsample_factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        emb = self.time_mlp(sinusoidal_embedding(t, self.base_channels))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResidualBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResidualBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
