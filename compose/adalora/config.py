"""The typed AdaLoRA configuration (torch-free): the keys of PEFT's AdaLoRA `adapter_config.json` that a
loaded adapter depends on, plus those PEFT writes but its AdaLoRA ignores (so a config round-trips).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from compose.errors import CompositionError
from compose.lora.config import MAX_ALPHA
from compose.targets import check_regexes


class AdaLoraConfig(BaseModel):
    """One AdaLoRA adapter's hyper-parameters: what ΔW = B·(E⊙A)·s/(ranknum + 1e-5) needs besides the tensors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["adalora"] = "adalora"
    init_r: PositiveInt = Field(12, description="Rank every module starts with before pruning; also the ranknum each kept module divides by.")
    target_r: int = Field(8, description="The average rank the budget allocator pruned towards (informational).")
    lora_alpha: float = Field(8, ge=-MAX_ALPHA, le=MAX_ALPHA, description="s in the scaling s/(ranknum + 1e-5); when <= 0, PEFT uses the module's rank instead.")
    rank_pattern: dict[str, list[bool]] | None = Field(
        None, description="Pruning masks over the init_r singular values, keyed '<module>.lora_E'; the saved tensors hold the kept rows only."
    )
    fan_in_fan_out: bool = Field(False, description="The base stores weights as (in, out), as GPT-2's Conv1D does.")
    target_modules: list[str] | str = Field(default_factory=list, description="Module-name suffixes, or one regex, that AdaLoRA targets.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules stored as full trained copies (e.g. a classifier head).")
    # Written by PEFT (AdaLoraConfig subclasses LoraConfig) but ignored by its AdaLoRA layers.
    r: int = Field(8, description="Ignored by AdaLoRA (init_r is the rank).")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Ignored by AdaLoRA.")
    use_rslora: bool = Field(False, description="Ignored by AdaLoRA.")
    lora_bias: bool = Field(False, description="Ignored by AdaLoRA.")
    use_dora: Literal[False] = Field(False, description="AdaLoRA has no DoRA variant (PEFT refuses it).")

    @field_validator("target_modules")
    @classmethod
    def _targets_compile(cls, value):
        return check_regexes(value, "target_modules")

    def masks(self) -> dict[str, list[bool]]:
        """`rank_pattern` keyed by module path: '<module>.lora_E' (or '<module>.lora_E.<adapter>', as PEFT holds it while training) → mask.

        >>> AdaLoraConfig(init_r=2, rank_pattern={"model.layers.0.q_proj.lora_E": [True, False]}).masks()
        {'model.layers.0.q_proj': [True, False]}
        """
        masks = {}
        for key, mask in (self.rank_pattern or {}).items():
            match = re.fullmatch(r"(.+)\.lora_E(\.[^.]+)?", key)
            if match is None:
                raise CompositionError(f"rank_pattern key '{key}' does not name a module's lora_E ('<module>.lora_E'); fix the adapter config")
            if len(mask) != self.init_r:
                raise CompositionError(f"rank_pattern['{key}'] has {len(mask)} entries but init_r is {self.init_r}; the mask must cover all init_r singular values")
            masks[match.group(1)] = mask
        return masks

    def scaling_for(self, rank: int) -> float:
        """The factor B·(E⊙A) is multiplied by at a module of `rank`: s/(ranknum + 1e-5).

        PEFT keeps ranknum = init_r when it prunes a module on load ("the scaling is exactly as the previous"),
        and s = lora_alpha, or the module's rank when lora_alpha <= 0.
        """
        s = self.lora_alpha if self.lora_alpha > 0 else float(rank)
        return s / (self.init_r + 1e-5)
