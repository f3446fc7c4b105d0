"""The typed AdapterFusion configuration (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FusionConfig(BaseModel):
    """Which adapters a fusion attends over, and how it is trained."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["attention"] = "attention"
    members: list[str] = Field(min_length=1, description="Adapter names, in order (the order of fusion_attention and of saved records).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T over the members' scores.")
    regularization: float = Field(0.01, ge=0, description="Weight of ‖I − V‖²_F (summed over layers) in the training loss.")

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[str]) -> list[str]:
        twice = sorted({m for m in members if members.count(m) > 1})
        if twice:
            raise ValueError(f"members {twice} are listed more than once")
        return members
