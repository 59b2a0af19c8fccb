"""What every model's config shares: a frozen dataclass of sizes, saved in its checkpoint as JSON,
checked when it is made."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Self


class ModelConfig:
    """Base of the models' frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """The fields, as a checkpoint's metadata holds them."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """The config of a checkpoint's metadata (JSON lists read back as tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_heads(dim: int, heads: int, name: str = "dim") -> None:
    """Attention of width ``dim`` splits into ``heads`` equal heads."""
    if dim % heads:
        raise ValueError(f"{name} {dim} must be divisible by {heads} heads")


def check_unet_plane(size: tuple[int, ...], levels: int, what: str) -> None:
    """An in-plane (y, x) size, the last two of ``size``, halves exactly at each of a UNet's
    ``levels`` - 1 down-samplings."""
    factor = 2 ** (levels - 1)
    if size[-2] % factor or size[-1] % factor:
        raise ValueError(
            f"{what} {size} in-plane size must be divisible by {factor} ({levels} UNet levels)"
        )
