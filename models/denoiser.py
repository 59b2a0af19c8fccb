"""The conditional 3D denoiser, after Tera-MIND: a UNet with in-plane down/up-sampling, time by
FiLM, and a gene encoder (genes as tokens through gene-gene self-attention) whose feature pyramid
is concatenated into every decoder level. Pure torch: no storage, no orchestration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import WindowAttention3D
from models.config import ModelConfig, check_heads, check_unet_plane
from models.layers import group_norm, resized_like, sinusoidal_embedding


@dataclass(frozen=True)
class DenoiserConfig(ModelConfig):
    """Sizes of the denoiser. ``patch`` is (z, y, x) voxels; ``cond_window`` is the (z, y, x) bins
    of the patch's footprint, seen with ``cond_context`` more bins on each side (Tera-MIND
    conditions a 2-slice chunk on a 4-slice gene window).

    ``sub_bin_offsets``: a patch may start at any voxel of a bin. The gene window is then read on
    the volume's fixed bin grid from the bin holding the patch's first voxel, one bin longer on
    every axis whose bin is over a voxel, and the model is given the patch's offset within that
    bin. A lattice shifted by voxels then conditions every step on the same bins.

    ``res_blocks`` residual blocks per UNet level (encoder and decoder); ``attention_levels``:
    the levels (0: full resolution) whose blocks are followed by windowed self-attention
    (``attention_window`` voxels in-plane, ``attention_heads`` heads), the middle too when the
    deepest level is one of them."""

    patch: tuple[int, int, int] = (4, 32, 32)
    cond_window: tuple[int, int, int] = (4, 2, 2)
    cond_context: tuple[int, int, int] = (1, 1, 1)
    genes: int = 32
    channels: int = 2
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 4)
    gene_dim: int = 64
    gene_heads: int = 4
    gene_layers: int = 2
    cond_channels: int = 8
    time_dim: int = 64
    sub_bin_offsets: bool = False
    res_blocks: int = 1
    attention_levels: tuple[int, ...] = ()
    attention_heads: int = 8
    attention_window: int = 16

    @property
    def bin(self) -> tuple[int, int, int]:
        """Voxels (z, y, x) of a gene bin: the patch over its window."""
        return tuple(p // w for p, w in zip(self.patch, self.cond_window, strict=True))

    @property
    def cond_extra(self) -> tuple[int, int, int]:
        """Bins the window adds to the footprint on each axis for patches that start within a
        bin (1 where the bin is over a voxel and ``sub_bin_offsets``, else 0)."""
        return tuple(int(self.sub_bin_offsets and b > 1) for b in self.bin)

    @property
    def cond_footprint(self) -> tuple[int, int, int]:
        """Bins (z, y, x) the patch may cover: its window plus ``cond_extra``."""
        return tuple(w + e for w, e in zip(self.cond_window, self.cond_extra, strict=True))

    @property
    def cond_input(self) -> tuple[int, int, int]:
        """Bins (z, y, x) of the gene window the model takes: footprint plus context."""
        return tuple(w + 2 * c for w, c in zip(self.cond_footprint, self.cond_context, strict=True))

    def __post_init__(self) -> None:
        check_unet_plane(self.patch, len(self.channel_mults), "patch")
        check_heads(self.gene_dim, self.gene_heads, "gene_dim")
        levels = len(self.channel_mults)
        if self.res_blocks < 1 or any(not 0 <= a < levels for a in self.attention_levels):
            raise ValueError(
                f"res_blocks {self.res_blocks} must be >= 1 and attention_levels "
                f"{self.attention_levels} among the {levels} levels"
            )
        for a in self.attention_levels:
            check_heads(self.base_channels * self.channel_mults[a], self.attention_heads, "level")


DENOISER_SIZES: dict[str, dict] = {
    "small": {},
    "tiny": {
        "base_channels": 4, "channel_mults": (1, 2), "gene_dim": 32, "gene_layers": 1,
        "cond_channels": 4, "time_dim": 32,
    },
    "base": {
        "patch": (2, 64, 64), "cond_window": (2, 4, 4), "base_channels": 64,
        "channel_mults": (1, 2, 4, 8), "res_blocks": 2, "attention_levels": (2, 3),
        "gene_dim": 256, "gene_heads": 8, "gene_layers": 2, "cond_channels": 32, "time_dim": 256,
    },
}  # fmt: skip
"""Named sizes: ``small`` (1.1 M parameters, 1.17 GFLOP per patch: the committed denoiser, for
CPUs), ``tiny`` (48 k parameters, 0.064 GFLOP per patch: throughput runs such as the gigavoxel
job) and ``base``, Tera-MIND's capacity class for GPUs: its 2-slice 64² patch on a 4-slice gene
window, 64 base channels x 1-2-4-8, two residual blocks per level, windowed attention at 16² and
below (parameters and FLOPs: tests/test_training_distributed.py prints them)."""


class ResBlock(nn.Module):
    """Conv residual block with FiLM (scale, shift) from the time embedding."""

    def __init__(self, cin: int, cout: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * cout)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(temb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class GeneAttentionLayer(nn.Module):
    """Pre-norm transformer layer over gene tokens that can return its gene x gene attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, g, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, g, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, g, d_head)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, g, d)
        x = x + self.proj(out)
        x = x + self.mlp(self.norm2(x))
        return x, attn.mean(dim=1)


class GeneEncoder(nn.Module):
    """Genes as tokens (each token = that gene's bins in the window), gene-gene self-attention,
    then back to a spatial map of genes; a convolution over the context margin turns it into
    conditioning features on the patch's footprint (one vector per bin)."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        window = math.prod(cfg.cond_input)
        self.window = cfg.cond_input
        self.embed = nn.Linear(window, cfg.gene_dim)
        self.gene_embedding = nn.Parameter(torch.randn(cfg.genes, cfg.gene_dim) * 0.02)
        self.layers = nn.ModuleList(
            GeneAttentionLayer(cfg.gene_dim, cfg.gene_heads) for _ in range(cfg.gene_layers)
        )
        self.unembed = nn.Linear(cfg.gene_dim, window)
        kernel = tuple(2 * c + 1 for c in cfg.cond_context)
        self.mix = nn.Conv3d(2 * cfg.genes, cfg.cond_channels, kernel)  # valid: -> footprint

    def forward(
        self, cond: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, g = cond.shape[:2]
        tokens = self.embed(torch.log1p(cond.clamp_min(0)).reshape(b, g, -1))
        tokens = tokens + self.gene_embedding
        maps = []
        for layer in self.layers:
            tokens, attn = layer(tokens)
            if return_attention:
                maps.append(attn)
        spatial = self.unembed(tokens).reshape(b, g, *self.window)
        # the attended genes and the raw log-counts, so density never has to pass attention
        raw = torch.log1p(cond.clamp_min(0))
        return F.silu(self.mix(torch.cat([spatial, raw], dim=1))), maps


class ConditionalUNet3D(nn.Module):
    """Predicts the noise ``eps`` of ``x`` (B, C, Z, Y, X) at timesteps ``t`` given gene bins
    ``cond`` (B, G, *cond_input) and, for ``sub_bin_offsets`` models, each patch's ``offset``
    (B, 3) in voxels within its first bin (zeros if not given). Gene features enter at the input
    and at every decoder level."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        self.time = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        self.genes = GeneEncoder(cfg)
        self.conv_in = nn.Conv3d(cfg.channels + cfg.cond_channels, chans[0], 3, padding=1)
        n = cfg.res_blocks
        self.down_blocks = nn.ModuleList()  # level l's blocks: [l * n, (l + 1) * n)
        self.downsamplers = nn.ModuleList()
        self.attention = nn.ModuleDict()  # "down<l>_<j>", "up<l>_<j>": after that block
        cin = chans[0]
        for i, c in enumerate(chans):
            for j in range(n):
                self.down_blocks.append(ResBlock(cin if j == 0 else c, c, cfg.time_dim))
                self._attend(f"down{i}_{j}", i, c)
            cin = c
            if i < len(chans) - 1:
                self.downsamplers.append(
                    nn.Conv3d(c, c, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))
                )
        self.mid = ResBlock(cin, cin, cfg.time_dim)
        self._attend("mid", len(chans) - 1, cin)
        self.cond_levels = nn.ModuleList(
            nn.Conv3d(cfg.cond_channels, cfg.cond_channels, 3, padding=1) for _ in chans
        )
        self.up_blocks = nn.ModuleList()  # deepest level first, n blocks each
        for i, c in reversed(list(enumerate(chans))):
            for j in range(n):
                first = cin + c + cfg.cond_channels
                self.up_blocks.append(ResBlock(first if j == 0 else c, c, cfg.time_dim))
                self._attend(f"up{i}_{j}", i, c)
            cin = c
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv3d(cin, cfg.channels, 3, padding=1)

    def _attend(self, name: str, level: int, channels: int) -> None:
        """Windowed attention after block ``name`` if ``level`` is an attention level."""
        if level in self.cfg.attention_levels:
            heads, window = self.cfg.attention_heads, self.cfg.attention_window
            self.attention[name] = WindowAttention3D(channels, heads, window)

    def _block(self, block: nn.Module, name: str, h: torch.Tensor, temb: torch.Tensor):
        """``block``, then its attention if it has one."""
        h = block(h, temb)
        return self.attention[name](h) if name in self.attention else h

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        temb = self.time(sinusoidal_embedding(t, self.cfg.time_dim))
        gene_map, _ = self.genes(cond)
        mode = "nearest"
        if self.cfg.sub_bin_offsets:  # features on the patch's voxels, then area-resized
            gene_map, mode = self._on_patch(gene_map, offset), "area"
        h = self.conv_in(torch.cat([x, F.interpolate(gene_map, size=x.shape[2:])], dim=1))
        n, levels, skips = self.cfg.res_blocks, len(self.cond_levels), []
        for level in range(levels):
            for j in range(n):
                h = self._block(self.down_blocks[level * n + j], f"down{level}_{j}", h, temb)
            skips.append(h)
            if level < levels - 1:
                h = self.downsamplers[level](h)
        h = self._block(self.mid, "mid", h, temb)
        for k, level in enumerate(reversed(range(levels))):
            skip = skips[level]
            h = resized_like(h, skip)
            cond_feat = F.interpolate(gene_map, size=skip.shape[2:], mode=mode)
            cond_feat = self.cond_levels[level](cond_feat)
            h = torch.cat([h, skip, cond_feat], dim=1)
            for j in range(n):
                h = self._block(self.up_blocks[k * n + j], f"up{level}_{j}", h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _on_patch(self, gene_map: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """Gene features per bin of the footprint (B, C, *cond_footprint) as features per voxel
        of the patch: each bin repeated over its voxels, cropped at each patch's offset."""
        for axis, n in enumerate(self.cfg.bin):
            gene_map = gene_map.repeat_interleave(n, dim=2 + axis)
        patch = self.cfg.patch
        if offset is None or not bool(offset.any()):
            return gene_map[:, :, : patch[0], : patch[1], : patch[2]]
        crops = [
            m[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]
            for m, (z, y, x) in zip(gene_map, offset.tolist(), strict=True)
        ]
        return torch.stack(crops)

    @torch.no_grad()
    def gene_attention(self, cond: torch.Tensor) -> torch.Tensor:
        """Gene x gene self-attention of the last encoder layer, averaged over heads: (B, G, G)."""
        _, maps = self.genes(cond, return_attention=True)
        return maps[-1]
