"""An exponential moving average of a model's weights, what a trained model samples with.

After each optimiser step the average moves towards the weights by ``1 - d``, with
``d = min(decay, (1 + n) / (10 + n))`` at update ``n``: short runs are not left near the random
initial weights, long ones average over about ``1 / (1 - decay)`` steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class EMA:
    """The average of ``module``'s floating-point weights (float32, on their device); other
    entries of its state (integer buffers) are copied."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in _floats(module).items()}

    def rate(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Move the average towards ``module``'s current weights."""
        d = self.rate()
        for name, value in _floats(module).items():
            self.shadow[name].lerp_(value.float(), 1.0 - d)
        self.updates += 1

    def weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state with the averaged weights in place of its floating ones."""
        state = module.state_dict()
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in state.items()}

    @contextmanager
    def swapped(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``module`` holding the averaged weights for the block, its own again after."""
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.weights(module))
        try:
            yield module
        finally:
            module.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "shadow": {k: v.cpu() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def _floats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
