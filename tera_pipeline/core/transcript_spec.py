"""How a transcript table is read: its layout (vendor), units, pixel size, z step and filters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TranscriptFormat = Literal["auto", "xenium", "merscope", "cosmx", "spatialdata", "table"]


class TranscriptSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: TranscriptFormat = "auto"
    """The table's layout: ``auto`` detects it from the column names."""
    units: Literal["auto", "um", "mm", "px"] = "auto"
    """Units of x and y (and of z when it is a position): ``auto`` is the layout's own."""
    pixel_size_um: float | None = Field(None, gt=0)
    """µm per pixel for ``px`` units (CosMx: 0.12028 µm unless given)."""
    z_step_um: float | None = Field(None, gt=0)
    """µm between z planes, for layouts whose z is a plane index (MERSCOPE, CosMx): required."""
    min_qv: float | None = Field(None, ge=0)
    """Transcripts of lower quality are dropped (Xenium: 20 unless given)."""
    keep_controls: bool = False
    """Keep control, blank and unassigned codewords (dropped and counted by default)."""
