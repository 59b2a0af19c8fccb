"""Windowed self-attention over a 3-D feature map (Tera-MIND's attention at 16² in-plane), with
RMS normalisation. Pure torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channels of a (B, C, ...) map, with a learnt gain."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(1, keepdim=True) + self.eps).to(x.dtype)
        return x * scale * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


class WindowAttention3D(nn.Module):
    """Residual multi-head self-attention within windows of (all z) x ``window`` x ``window``
    voxels of a (B, C, Z, Y, X) map (the whole map where it is no larger). The output projection
    starts at zero, so the block starts as the identity."""

    def __init__(self, channels: int, heads: int, window: int = 16) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} must be divisible by {heads} heads")
        self.heads, self.window = heads, window
        self.norm = ChannelRMSNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, z, y, xx = x.shape
        wy, wx = min(self.window, y), min(self.window, xx)
        if y % wy or xx % wx:
            raise ValueError(f"map {y} x {xx} is not a whole number of {wy} x {wx} windows")
        ny, nx = y // wy, xx // wx
        # (B, C, Z, ny, wy, nx, wx) -> (B * ny * nx, Z * wy * wx, C): one sequence per window
        t = self.norm(x).reshape(b, c, z, ny, wy, nx, wx).permute(0, 3, 5, 2, 4, 6, 1)
        t = t.reshape(b * ny * nx, z * wy * wx, c)
        qkv = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, self.heads, -1).transpose(1, 3)
        out = F.scaled_dot_product_attention(*qkv.unbind(2))  # (windows, heads, tokens, d)
        out = self.proj(out.transpose(1, 2).reshape(t.shape))
        out = out.reshape(b, ny, nx, z, wy, wx, c).permute(0, 6, 3, 1, 4, 2, 5)
        return x + out.reshape(b, c, z, y, xx)
