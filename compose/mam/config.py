"""The typed MAM configuration (torch-free): a prefix and a (parallel) bottleneck adapter."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compose.bottleneck.config import BottleneckConfig
from compose.prefix.config import PrefixConfig


def _parallel_adapter() -> BottleneckConfig:
    return BottleneckConfig.preset("par_bn")


class MamConfig(BaseModel):
    """One MAM adapter. AdapterHub's defaults: a 30-token prefix (trained through an 800-wide MLP, saved as that MLP
    and imported as its output) and `par_bn` (reduction 2, scaling 4) after the feed-forward block."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["mam"] = "mam"
    prefix: PrefixConfig = Field(description="The prefix half; AdapterHub's real tokens keep positions from 0 (position_offset=False).")
    adapter: BottleneckConfig = Field(default_factory=_parallel_adapter, description="The bottleneck half (parallel in MAM).")
