"""Diffusion maths both ways: the linear-beta schedule, the forward noising and training target
(training), and the sampling steps: DDIM, or DPM-Solver++(2M) (Lu et al. 2022), a second-order
multistep solver that also uses the previous step's x0 prediction.

Everything here is a pure function of its arguments so that any block, on any worker, in any
order, computes the same numbers for the same voxels (the scheduler half of the diffusers split).
The schedule is the one place that knows what the model's output (ε or v) means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, TypeVar

import numpy as np

Prediction = Literal["epsilon", "v"]
Sampler = Literal["ddim", "dpmpp_2m"]
SAMPLERS: tuple[Sampler, ...] = ("ddim", "dpmpp_2m")

Array = TypeVar("Array")
"""A float32 numpy array or torch tensor: the sampling steps take either (on the device that
holds the block), with every scalar a Python float so that float32 stays float32."""


def _float32(x: Array) -> Array:
    return x.astype(np.float32, copy=False) if isinstance(x, np.ndarray) else x.float()


def _clipped_x0(x0: Array) -> Array:
    """``x0`` (an array of this module's own) clipped to [-1, 1] in place, as float32."""
    if isinstance(x0, np.ndarray):
        np.clip(x0, -1.0, 1.0, out=x0)
    else:
        x0.clamp_(-1.0, 1.0)
    return _float32(x0)


@dataclass(frozen=True)
class Schedule:
    """Linear beta schedule (T steps) sampled in ``steps`` steps by ``sampler``: DDIM (with
    ``eta``) or DPM-Solver++(2M) (deterministic; it needs the previous step's x0 prediction).

    ``prediction`` is what the model outputs: the noise ε (Tera-MIND) or the velocity
    v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0. Both are affine in the model output per voxel, so blending
    outputs of overlapping patches and then converting is the same as converting then blending.
    """

    train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    steps: int = 15
    eta: float = 0.0
    prediction: Prediction = "epsilon"
    sampler: Sampler = "ddim"

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= self.train_steps:
            raise ValueError(f"DDIM steps must be in [1, {self.train_steps}], got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be 'epsilon' or 'v', got {self.prediction!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "dpmpp_2m" and self.eta:
            raise ValueError("the dpmpp_2m sampler is deterministic: eta must be 0")

    @property
    def needs_previous_x0(self) -> bool:
        """Whether a step needs the x0 prediction of the step before (kept as scratch)."""
        return self.sampler == "dpmpp_2m" and self.steps > 2

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        betas = np.linspace(self.beta_start, self.beta_end, self.train_steps, dtype=np.float64)
        return np.cumprod(1.0 - betas)

    @cached_property
    def timesteps(self) -> np.ndarray:
        """Model timesteps from noisiest to cleanest ("leading" spacing, as diffusers)."""
        ratio = self.train_steps // self.steps
        return (np.arange(self.steps) * ratio)[::-1].astype(np.int64)

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def sigma(self, step: int) -> float:
        """DDIM noise scale for sampling step ``step`` (0 = first, noisiest)."""
        t, t_prev = self.timestep(step), self.previous_timestep(step)
        a, a_prev = self.alpha(t), self.alpha(t_prev)
        return float(self.eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)))

    def timestep(self, step: int) -> int:
        return int(self.timesteps[step])

    def previous_timestep(self, step: int) -> int:
        return int(self.timesteps[step + 1]) if step + 1 < self.steps else -1

    def ddim_update(self, x: Array, output: Array, step: int, noise: Array | None = None) -> Array:
        """One DDIM update of ``x`` given the model's ``output`` (ε or v; voxel-wise, float32)."""
        return self._ddim(x, output, step, noise)[0]

    def _ddim(self, x: Array, output: Array, step: int, noise: Array | None) -> tuple[Array, Array]:
        """(the next x, the clipped x0 prediction) of a DDIM step."""
        t, t_prev = self.timestep(step), self.previous_timestep(step)
        a_prev = self.alpha(t_prev)
        x0, eps = self.split_output(x, output, t)
        x0 = _clipped_x0(x0)
        sigma = self.sigma(step)
        out = x0 * math.sqrt(a_prev)  # sums and products of new arrays in place: the same bits
        out += eps * math.sqrt(max(1 - a_prev - sigma**2, 0.0))
        if sigma > 0:
            if noise is None:
                raise ValueError("eta > 0 needs fresh noise for the update")
            out += noise * sigma
        return _float32(out), x0

    def update(
        self,
        x: Array,
        output: Array,
        step: int,
        noise: Array | None = None,
        previous_x0: Array | None = None,
    ) -> tuple[Array, Array]:
        """One sampling step of ``x`` given the model's ``output``: (the next x, this step's
        clipped x0 prediction, which the next DPM-Solver++ step takes as ``previous_x0``).
        Numpy arrays or torch tensors (float32), on whichever device holds them."""
        if self.sampler == "ddim":
            return self._ddim(x, output, step, noise)
        return self.dpmpp_2m_update(x, output, step, previous_x0)

    def _log_snr(self, t: int) -> float:
        """λ_t = log(sqrt(ᾱ_t) / sqrt(1 - ᾱ_t)), half the log signal-to-noise ratio."""
        a = self.alpha(t)
        return 0.5 * float(np.log(a) - np.log1p(-a))

    def dpmpp_2m_update(
        self, x: Array, output: Array, step: int, previous_x0: Array | None
    ) -> tuple[Array, Array]:
        """One DPM-Solver++(2M) step (data prediction, multistep): first order at the first and
        the last step (where it reduces to DDIM with x0 clipped), second order in between from
        this and ``previous_x0``, the x0 prediction of the step before. Returns (x, x0)."""
        t, t_prev = self.timestep(step), self.previous_timestep(step)
        x0 = _clipped_x0(self.split_output(x, output, t)[0])
        if t_prev < 0:  # the last step: sigma 0, the sample is the data prediction
            return x0, x0
        a, a_prev = self.alpha(t), self.alpha(t_prev)
        h = self._log_snr(t_prev) - self._log_snr(t)
        d = x0
        if step > 0 and self.needs_previous_x0:
            if previous_x0 is None:
                raise ValueError("a second-order DPM-Solver++ step needs the previous x0")
            h_last = self._log_snr(t) - self._log_snr(self.timestep(step - 1))
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * _float32(previous_x0)
        ratio = math.sqrt((1 - a_prev) / (1 - a))
        out = ratio * x - math.sqrt(a_prev) * math.expm1(-h) * d
        return _float32(out), x0

    def split_output(self, x: Array, output: Array, t: int) -> tuple[Array, Array]:
        """The clean sample x0 and the noise ε that the model's ``output`` (ε or v) at ``x`` =
        x_t implies (the inverse of ``add_noise`` and ``training_target``)."""
        a = self.alpha(t)
        signal, spread = math.sqrt(a), math.sqrt(1 - a)
        if self.prediction == "v":
            x0 = signal * x - spread * output
            eps = signal * output + spread * x
        else:  # (x - spread * output) / signal, bit for bit, in one new array
            x0 = output * -spread
            x0 += x
            x0 /= signal
            eps = output
        return x0, eps

    def _scales(self, t: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """sqrt(ᾱ_t) and sqrt(1 - ᾱ_t) in float32 for a batch of timesteps, shaped (B, 1, ...) to
        broadcast over samples of ``ndim`` dimensions."""
        a = self.alphas_cumprod[t].astype(np.float32).reshape((-1,) + (1,) * (ndim - 1))
        return np.sqrt(a), np.sqrt(1 - a)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Forward process: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε for a batch (``t`` per sample)."""
        signal, spread = self._scales(t, x0.ndim)
        return signal * x0 + spread * noise

    def training_target(self, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
        """What the model should output at ``add_noise(x0, noise, t)``: ε, or the velocity
        v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0."""
        if self.prediction == "epsilon":
            return noise
        signal, spread = self._scales(t, x0.ndim)
        return signal * noise - spread * x0
