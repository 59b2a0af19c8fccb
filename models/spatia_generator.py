"""SPATIA's generator: conditional flow matching (rectified flow) with a small UNet that maps
noise to a cell crop given the cell's expression, sampled with a fixed-step Euler integrator (one
noise draw gives the "before" and "after" images of a perturbation). Pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import group_norm, resized_like, sinusoidal_embedding, unet_down
from models.spatia_config import SpatiaConfig, expression_values


class ResBlock2D(nn.Module):
    """Conv residual block with FiLM (scale, shift) from the time-and-expression condition."""

    def __init__(self, cin: int, cout: int, cond: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(cond, 2 * cout)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return h + self.skip(x)


class FlowGenerator(nn.Module):
    """Velocity field v(x_t, t | expression) of a rectified flow from noise (t = 0) to cell
    crops (t = 1), a UNet with FiLM from the time and expression embeddings."""

    def __init__(self, cfg: SpatiaConfig) -> None:
        super().__init__()
        td = cfg.time_dim
        self.time_dim = td
        self.time = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.expression = nn.Sequential(
            nn.Linear(cfg.genes + 1, 2 * td), nn.SiLU(), nn.Linear(2 * td, td)
        )
        self.null = nn.Parameter(torch.zeros(td))
        chans = [cfg.gen_channels * m for m in cfg.gen_mults]
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        cin = chans[0]
        for i, c in enumerate(chans):
            self.down.append(ResBlock2D(cin, c, td))
            cin = c
            if i < len(chans) - 1:
                self.pool.append(nn.Conv2d(c, c, 4, stride=2, padding=1))
        self.mid = ResBlock2D(cin, cin, td)
        self.up = nn.ModuleList()
        for c in reversed(chans):
            self.up.append(ResBlock2D(cin + c, c, td))
            cin = c
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def condition(self, counts: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The expression embedding; rows in ``drop`` get the learned unconditional one."""
        values, log_total = expression_values(counts)
        c = self.expression(torch.cat([values, log_total], dim=1))
        if drop is not None:
            c = torch.where(drop[:, None], self.null.expand_as(c), c)
        return c

    def forward(self, x, t, cond):
        c = F.silu(self.time(sinusoidal_embedding(t, self.time_dim, scale=1000.0)) + cond)
        h = self.conv_in(x)
        h, skips = unet_down(h, self.down, self.pool, c)
        h = self.mid(h, c)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            h = block(torch.cat([resized_like(h, skip), skip], dim=1), c)
        return self.conv_out(F.silu(self.norm_out(h)))

    def loss(self, x1, counts, gen: torch.Generator, drop_rate: float = 0.1) -> torch.Tensor:
        """Conditional flow-matching MSE: x_t = (1 - t) x0 + t x1, target x1 - x0; the draws come
        from ``gen`` (a CPU generator) and move to ``x1``'s device."""
        x0 = torch.randn(x1.shape, generator=gen).to(x1.device)
        t = torch.rand(len(x1), generator=gen).to(x1.device)
        drop = (torch.rand(len(x1), generator=gen) < drop_rate).to(x1.device)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
        return F.mse_loss(self(xt, t, self.condition(counts, drop)), x1 - x0)

    @torch.no_grad()
    def sample(self, counts, noise, steps: int = 16, guidance: float = 1.0) -> torch.Tensor:
        """Euler integration from ``noise`` (t = 0) to images (t = 1) given ``counts``;
        ``guidance`` > 1 is classifier-free guidance against the unconditional field."""
        cond = self.condition(counts)
        null = self.null.expand_as(cond)
        x = noise
        for k in range(steps):
            t = torch.full((len(x),), k / steps, device=x.device)
            v = self(x, t, cond)
            if guidance != 1.0:
                v = self(x, t, null) + guidance * (v - self(x, t, null))
            x = x + v / steps
        return x.clamp(-1.0, 1.0)
