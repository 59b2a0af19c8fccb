"""Noise keyed by position, the DDIM schedule, and the blending window."""

from __future__ import annotations

import numpy as np
import pytest

from tera_pipeline.core.geometry import Box
from tera_pipeline.core.noise import position_noise
from tera_pipeline.generation.blending import Accumulator, patch_window
from tera_pipeline.generation.schedule import DDIMSchedule


def test_noise_is_a_function_of_position_only():
    big = Box((-3, -10, 5), (20, 150, 90))
    sub = Box((4, 60, 40), (9, 33, 17))
    a = position_noise(11, 0, big, 2)
    b = position_noise(11, 0, sub, 2)
    np.testing.assert_array_equal(a[(slice(None), *sub.slices(big))], b)
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02
    assert not np.array_equal(b, position_noise(12, 0, sub, 2))  # seed
    assert not np.array_equal(b, position_noise(11, 1, sub, 2))  # stream (step noise)


def test_schedule_matches_tera_mind():
    s = DDIMSchedule(steps=15)
    assert s.timesteps[0] == 924 and s.timesteps[-1] == 0 and len(s.timesteps) == 15
    np.testing.assert_allclose(s.alphas_cumprod[0], 1 - 1e-4)
    assert s.sigma(3) == 0.0
    assert DDIMSchedule(steps=15, eta=1.0).sigma(3) > 0
    with pytest.raises(ValueError):
        DDIMSchedule(steps=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_with_an_oracle_recovers_x0(prediction):
    s = DDIMSchedule(steps=10, prediction=prediction)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (2, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = s.timestep(0)
    x = s.add_noise(x0[None], eps[None], np.array([t]))[0]
    for step in range(s.steps):  # an oracle denoiser: output consistent with x0 at every step
        a = s.alpha(s.timestep(step))
        eps_hat = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        v_hat = np.sqrt(a) * eps_hat - np.sqrt(1 - a) * x0
        x = s.ddim_update(x, eps_hat if prediction == "epsilon" else v_hat, step)
    np.testing.assert_allclose(x, x0, atol=1e-4)


@pytest.mark.parametrize("kind", ["cosine", "gaussian", "constant"])
def test_window_is_positive_everywhere(kind):
    w = patch_window((4, 32, 32), kind)
    assert w.shape == (4, 32, 32) and w.min() > 0
    assert w[2, 16, 16] == w.max()


def test_accumulator_normalises_by_summed_weights():
    target = Box((0, 0, 0), (4, 48, 48))
    acc = Accumulator(target, channels=1)
    w = patch_window((4, 32, 32))
    for y in (0, 16):
        for x in (0, 16):
            acc.add(Box((0, y, x), (4, 32, 32)), np.full((1, 4, 32, 32), 3.0, np.float32), w)
    np.testing.assert_allclose(acc.result(), 3.0, rtol=1e-6)
    uncovered = Accumulator(Box((0, 0, 0), (4, 64, 64)), channels=1)
    uncovered.add(Box((0, 0, 0), (4, 32, 32)), np.ones((1, 4, 32, 32), np.float32), w)
    with pytest.raises(RuntimeError, match="got no patch"):
        uncovered.result()
