"""SPATIA after Kong et al. (2025): cell embeddings that fuse morphology, expression and spatial
context, and a generator of cell images conditioned on expression. Pure torch: no storage, no
orchestration.

- Cell level: a small ViT over a cell crop (2-D, or 3-D with the z-slices as channels) gives
  morphology tokens; the cell's expression gives gene tokens (gene identity embedding + value
  embedding) and one transcriptomic vector token (the whole profile and its library size)
  through a transformer; cross-attention fuses them in both directions (genes query image
  tokens, image tokens query genes); the vector token and the mean image token give the cell
  embedding. Decoders read only the embedding: a zero-inflated negative binomial (ZINB) over
  every gene (expression reconstruction, and imputation of masked genes), and every patch's
  pixels and texture (the spread of its pixels per stain) from an input with half of the patches
  masked (masked image reconstruction), weighted towards the crop's centre, where the cell is.
- Niche and tissue level: one transformer over the cells of a grid niche (cell embeddings plus
  their position in the niche), one over the niches of a tissue tile; each gives contextual
  member embeddings and a pooled embedding.
- Generator: conditional flow matching (rectified flow) with a small UNet that maps noise to a
  cell crop given the cell's expression; sampled with a fixed-step Euler integrator, so one
  noise draw gives the "before" and "after" images of a perturbation
  (``models.spatia_generator``).

The sizes, and how expression enters the model, are in ``models.spatia_config``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.spatia_config import SpatiaConfig, expression_values
from models.spatia_generator import FlowGenerator


# -- transformer parts --------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself when None); ``key_mask`` (B, M)
    is True for keys that may be attended."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, key_mask=None):
        b, n, d = x.shape
        m, h = context.shape[1], self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    """Pre-norm transformer layer: self-attention, or with ``cross`` attention to a context."""

    def __init__(self, dim: int, heads: int, cross: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, context=None, key_mask=None):
        h = self.norm(x)
        ctx = h if self.norm_context is None else self.norm_context(context)
        x = x + self.attn(h, ctx, key_mask)
        return x + self.mlp(self.norm_mlp(x))


@dataclass
class CellOutput:
    embedding: torch.Tensor  # (B, E) fused cell embedding
    log_rate: torch.Tensor  # (B, G) log of the ZINB mean per unit of observed library
    dropout_logit: torch.Tensor  # (B, G)
    log_library: torch.Tensor  # (B, 1) log1p(observed total)
    pixels: torch.Tensor  # (B, T, in_channels * patch * patch) reconstructed patches
    texture: torch.Tensor  # (B, T, in_channels) reconstructed std of each patch's pixels
    type_logits: torch.Tensor | None

    @property
    def mean(self) -> torch.Tensor:
        """Expected counts (ZINB mean) of every gene, at the observed library size."""
        mu = torch.exp(self.log_library + self.log_rate)
        return mu * torch.sigmoid(-self.dropout_logit)


class CellEncoder(nn.Module):
    """Morphology tokens (ViT) and gene tokens (transformer) fused by cross-attention."""

    def __init__(self, cfg: SpatiaConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.patchify = nn.Conv2d(cfg.in_channels, d, cfg.patch, stride=cfg.patch)
        self.position = nn.Parameter(torch.randn(1, cfg.tokens, d) * 0.02)
        self.patch_mask = nn.Parameter(torch.zeros(d))
        self.morph = nn.ModuleList(Layer(d, cfg.heads) for _ in range(cfg.morph_layers))
        self.gene_id = nn.Parameter(torch.randn(cfg.genes, d) * 0.02)
        self.value = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        self.gene_mask = nn.Parameter(torch.zeros(d))
        # the transcriptomic vector token: the whole profile (values, which are hidden, library)
        self.profile = nn.Sequential(
            nn.Linear(2 * cfg.genes + 1, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        )
        self.gene_layers = nn.ModuleList(Layer(d, cfg.heads) for _ in range(cfg.gene_layers))
        self.genes_query = nn.ModuleList(
            Layer(d, cfg.heads, cross=True) for _ in range(cfg.fusion_layers)
        )
        self.images_query = nn.ModuleList(
            Layer(d, cfg.heads, cross=True) for _ in range(cfg.fusion_layers)
        )
        e = cfg.embed_dim
        self.embed = nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, e))
        # decoders read the embedding only: it must hold the expression and the morphology
        self.expression = nn.Sequential(
            nn.Linear(e, 2 * d), nn.GELU(), nn.Linear(2 * d, 2 * cfg.genes)
        )
        self.log_theta = nn.Parameter(torch.zeros(cfg.genes))
        self.pixel_position = nn.Parameter(torch.randn(1, cfg.tokens, d) * 0.02)
        self.pixel_embed = nn.Linear(e, d)
        self.pixel_decoder = nn.Sequential(nn.GELU(), nn.Linear(d, d), nn.GELU())
        self.pixels = nn.Linear(d, cfg.in_channels * cfg.patch**2)
        self.texture = nn.Linear(d, cfg.in_channels)
        self.type_head = nn.Linear(cfg.embed_dim, cfg.cell_types) if cfg.cell_types else None

    def forward(self, crops, counts, gene_mask=None, patch_mask=None) -> CellOutput:
        """``crops`` (B, in_channels, Y, X) in [-1, 1]; ``counts`` (B, G) raw counts;
        ``gene_mask`` (B, G) True = hidden gene; ``patch_mask`` (B, T) True = hidden patch."""
        m = self.patchify(crops).flatten(2).transpose(1, 2)
        if patch_mask is not None:
            m = torch.where(patch_mask[..., None], self.patch_mask.expand_as(m), m)
        m = m + self.position
        for layer in self.morph:
            m = layer(m)
        values, log_total = expression_values(counts, gene_mask)
        g = self.value(values[..., None])
        if gene_mask is not None:
            g = torch.where(gene_mask[..., None], self.gene_mask.expand_as(g), g)
        hidden = torch.zeros_like(values) if gene_mask is None else gene_mask.float()
        profile = self.profile(torch.cat([values, hidden, log_total], dim=1))
        g = torch.cat([g + self.gene_id, profile[:, None]], dim=1)
        for layer in self.gene_layers:
            g = layer(g)
        for genes_q, images_q in zip(self.genes_query, self.images_query, strict=True):
            g, m = genes_q(g, m), images_q(m, g)
        embedding = self.embed(torch.cat([g[:, -1], m.mean(dim=1)], dim=1))
        log_rate, dropout = self.expression(embedding).chunk(2, dim=1)
        hidden = self.pixel_decoder(self.pixel_embed(embedding)[:, None] + self.pixel_position)
        # the type head is a probe: it reads the embedding without shaping it
        types = None if self.type_head is None else self.type_head(embedding.detach())
        pixels, texture = self.pixels(hidden), self.texture(hidden)
        return CellOutput(embedding, log_rate, dropout, log_total, pixels, texture, types)

    def patches(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops as the ViT's patch pixel vectors (B, T, in_channels * patch * patch)."""
        p = self.cfg.patch
        b, c, y, x = crops.shape
        t = crops.reshape(b, c, y // p, p, x // p, p).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(b, (y // p) * (x // p), c * p * p)


def zinb_nll(x, log_mu, log_theta, pi_logit, eps: float = 1e-8) -> torch.Tensor:
    """Mean negative log-likelihood of counts ``x`` under ZINB(mu, theta, pi)."""
    theta = torch.exp(log_theta)
    mu = torch.exp(log_mu)
    log_theta_mu = torch.log(theta + mu + eps)
    nb_zero = theta * (log_theta - log_theta_mu)
    nb = (
        nb_zero
        + x * (log_mu - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    zero = F.softplus(-pi_logit + nb_zero) - F.softplus(-pi_logit)
    nonzero = -pi_logit - F.softplus(-pi_logit) + nb
    return -torch.where(x < 0.5, zero, nonzero).mean()


@dataclass(frozen=True)
class CellLossWeights:
    """Weights of the cell-level losses. The image terms are weighted up against the ZINB, and
    towards the crop's centre by a Gaussian of ``centre_sigma_px`` over the patch centres
    (neighbours fill the crop's rim; the niche level models them). The texture term (the std of
    a patch's pixels per stain) keeps the chromatin texture, whose random phase pixel MSE
    cannot reconstruct and so averages away. Chosen by measurement (docs/ARCHITECTURE.md)."""

    image: float = 4.0
    texture: float = 16.0
    centre_sigma_px: float = 6.0

    def to_dict(self) -> dict:
        return asdict(self)


CELL_LOSS_WEIGHTS = CellLossWeights()


def centre_weights(cfg: SpatiaConfig, sigma_px: float) -> torch.Tensor:
    """A Gaussian weight per ViT patch (T,) by its centre's distance to the crop's centre,
    with mean 1 (all ones for ``sigma_px`` <= 0)."""
    p = cfg.patch
    y = (torch.arange(cfg.crop[1] // p) + 0.5) * p - cfg.crop[1] / 2
    x = (torch.arange(cfg.crop[2] // p) + 0.5) * p - cfg.crop[2] / 2
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    w = torch.exp(-d2 / (2 * sigma_px**2)) if sigma_px > 0 else torch.ones_like(d2)
    return (w / w.mean()).reshape(-1)


def cell_losses(
    model: CellEncoder,
    out: CellOutput,
    crops: torch.Tensor,
    counts: torch.Tensor,
    weights: CellLossWeights = CELL_LOSS_WEIGHTS,
) -> dict:
    """SPATIA's representation losses: ZINB reconstruction of ``counts`` over every gene (masked
    ones included: imputation) at their own library size, and reconstruction of every patch's
    pixels and texture (the input had patches masked), weighted towards the centre. Training
    gives thinned counts as input and the full counts here (denoising)."""
    library = torch.log1p(counts.sum(dim=1, keepdim=True))
    expression = zinb_nll(counts, library + out.log_rate, model.log_theta, out.dropout_logit)
    target = model.patches(crops)
    texture = target.reshape(*target.shape[:-1], model.cfg.in_channels, -1).std(dim=-1)
    pixel_err = ((out.pixels - target) ** 2).mean(dim=-1)
    texture_err = ((out.texture - texture) ** 2).mean(dim=-1)
    w = centre_weights(model.cfg, weights.centre_sigma_px).to(pixel_err.device)
    image = weights.image * ((pixel_err + weights.texture * texture_err) * w).mean()
    return {"expression": expression, "image": image}


# -- niche and tissue ---------------------------------------------------------------------------
def fourier(pos: torch.Tensor, bands: int = 3) -> torch.Tensor:
    """Sin/cos features of positions in [-1, 1]: (..., 3) -> (..., 6 * bands)."""
    freq = math.pi * 2.0 ** torch.arange(bands, dtype=pos.dtype, device=pos.device)
    args = pos[..., None] * freq
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1).flatten(-2)


class ContextEncoder(nn.Module):
    """A transformer over a set of member embeddings with positions (cells of a niche, or
    niches of a tissue tile) and a summary token: contextual members and a pooled embedding.
    Heads predict a hidden member's expression and the set's mean expression."""

    def __init__(self, cfg: SpatiaConfig) -> None:
        super().__init__()
        d, e = cfg.dim, cfg.embed_dim
        self.inp = nn.Linear(e, d)
        self.pos = nn.Linear(18, d)
        self.summary = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.hidden = nn.Parameter(torch.zeros(d))
        self.layers = nn.ModuleList(Layer(d, cfg.heads) for _ in range(cfg.context_layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, e)
        self.member_expression = nn.Linear(e, cfg.genes)
        self.set_expression = nn.Linear(e, cfg.genes)

    def forward(self, x, pos, valid, hidden=None):
        """``x`` (B, N, E), ``pos`` (B, N, 3) in [-1, 1], ``valid`` (B, N) bool, ``hidden``
        (B, N) bool: members replaced by a learned token. Returns ((B, N, E), (B, E))."""
        h = self.inp(x)
        if hidden is not None:
            h = torch.where(hidden[..., None], self.hidden.expand_as(h), h)
        h = h + self.pos(fourier(pos))
        h = torch.cat([self.summary.expand(len(h), -1, -1), h], dim=1)
        keys = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        for layer in self.layers:
            h = layer(h, key_mask=keys)
        h = self.out(self.norm(h))
        return h[:, 1:], h[:, 0]


class Spatia(nn.Module):
    """The whole model: cell encoder, niche and tissue transformers, and the generator."""

    def __init__(self, cfg: SpatiaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cell = CellEncoder(cfg)
        self.niche = ContextEncoder(cfg)
        self.tissue = ContextEncoder(cfg)
        self.generator = FlowGenerator(cfg)
