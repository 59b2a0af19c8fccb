"""The model's intensity range [-1, 1] and the stored uint8 intensities, both ways."""

from __future__ import annotations

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Map [-1, 1] to uint8 intensities (rounded, clipped)."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(image: np.ndarray) -> np.ndarray:
    """Map uint8 intensities to float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0
