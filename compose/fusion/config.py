"""The typed AdapterFusion configuration (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FusionConfig(BaseModel):
    """Which adapters a fusion attends over, and how it is trained."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["attention"] = "attention"
    members: list[str] = Field(min_length=1, description="Adapter names, in order (the order of fusion_attention and of saved records).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T over the members' scores.")
    regularization: float = Field(0.01, ge=0, description="Weight of ‖I − V‖²_F (summed over layers) in the training loss.")
    # AdapterHub's placement of a bottleneck fusion's query and residual (LoRA fusions ignore them)
    query_before_ln: bool = Field(False, description="Bottleneck fusion: the query is the sub-layer output before its LayerNorm.")
    residual_before: bool = Field(False, description="Bottleneck fusion: the residual is taken before the adapters' own.")

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[str]) -> list[str]:
        twice = sorted({m for m in members if members.count(m) > 1})
        if twice:
            raise ValueError(f"members {twice} are listed more than once")
        return members
