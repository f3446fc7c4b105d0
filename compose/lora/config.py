"""The typed LoRA configuration the engine computes with (torch-free).

The fields mirror PEFT's `LoraConfig` names so a PEFT `adapter_config.json` maps onto it directly;
`zoo.manifest` embeds this model as the `lora` member of its method union.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from compose.targets import check_regexes

#: The largest |lora_alpha| (and alpha_pattern value) accepted: real adapters use at most a few thousand, and
#: a scaling near fp32's limit (3.4e38) turns every merged or computed weight into inf.
MAX_ALPHA = 1e6


def match_pattern_key(patterns: dict, module_name: str) -> str | None:
    """The key of `patterns` that matches `module_name` the way PEFT matches `rank_pattern` keys.

    A key matches when it equals the module name or a dotted suffix of it (keys are regexes).

    >>> match_pattern_key({"layers.1.q_proj": 2}, "model.layers.1.q_proj")
    'layers.1.q_proj'
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


class LoraConfig(BaseModel):
    """One LoRA adapter's hyper-parameters: what `W + s·B·A` needs besides the tensors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["lora"] = "lora"
    r: PositiveInt = Field(description="Default rank of the A/B factors.")
    lora_alpha: float = Field(ge=-MAX_ALPHA, le=MAX_ALPHA, description="Default alpha; scaling is alpha/r (alpha/sqrt(r) with rsLoRA).")
    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict, description="Per-module rank overrides (PEFT pattern keys).")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alpha overrides (PEFT pattern keys).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (magnitude vector per output).")
    fan_in_fan_out: bool = Field(False, description="The base stores weights as (in, out), as GPT-2's Conv1D does.")
    lora_bias: bool = Field(False, description="lora_B carries a bias.")
    target_modules: list[str] | str = Field(default_factory=list, description="Module-name suffixes, or one regex, that LoRA targets.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules stored as full trained copies (e.g. a classifier head).")
    init_lora_weights: Literal["pissa", "olora"] | None = Field(
        None, description="Trained from PiSSA / OLoRA factors B₀, A₀ of the base weight: it adapts the residual W − s·B₀·A₀ (`compose.lora.residual`).",
    )

    @field_validator("rank_pattern", "alpha_pattern", "target_modules")
    @classmethod
    def _patterns_compile(cls, value, info):
        return check_regexes(value, info.field_name)

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for key, alpha in value.items():
            if abs(alpha) > MAX_ALPHA:
                raise ValueError(f"alpha_pattern[{key!r}] = {alpha:g} is out of range (|alpha| <= {MAX_ALPHA:g})")
        return value

    @classmethod
    def at_scaling_one(cls, ranks: dict[str, int], **fields) -> LoraConfig:
        """The config of factors meant for scaling 1 with `ranks` per module path: r is the most common rank and
        lora_alpha = r, the other modules get exact-path rank/alpha patterns (alpha = rank), as PEFT's
        `add_weighted_adapter` writes them. `fields` (e.g. target_modules) are passed on."""
        r = max(ranks.values(), key=list(ranks.values()).count)
        patterns = {re.escape(m): k for m, k in ranks.items() if k != r}
        return cls(r=r, lora_alpha=r, rank_pattern=patterns, alpha_pattern={m: float(k) for m, k in patterns.items()}, **fields)

    def rank_for(self, module_name: str) -> int:
        key = match_pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = match_pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        """s in W + s·B·A for this module."""
        rank = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(rank) if self.use_rslora else rank)
