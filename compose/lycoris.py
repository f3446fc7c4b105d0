"""What LoHa and LoKr configs share (torch-free), as PEFT's `LycorisConfig`: a rank and an alpha per module,
with `rank_pattern` / `alpha_pattern` overrides, and scaling alpha/r."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from compose.lora.config import match_pattern_key


class LycorisConfig(BaseModel):
    """The fields PEFT's `LoHaConfig` and `LoKrConfig` both write; names are their `adapter_config.json` keys."""

    model_config = ConfigDict(extra="forbid")

    r: PositiveInt = Field(8, description="Default rank of the factors.")
    alpha: float = Field(8, description="Default alpha; the delta is scaled by alpha/r.")
    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict, description="Per-module rank overrides (PEFT pattern keys).")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alpha overrides (PEFT pattern keys).")
    rank_dropout: float = Field(0.0, description="Training only: drops rows of the delta; no effect at inference.")
    module_dropout: float = Field(0.0, description="Training only: skips the whole delta; no effect at inference.")
    use_effective_conv2d: bool = Field(
        False, description="Conv layers only (CP decomposition of the kernel); the engine adapts Linear and Conv1D targets, where it has no effect."
    )
    target_modules: list[str] | str = Field(default_factory=list, description="Module-name suffixes, or one regex, that the adapter targets.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules stored as full trained copies (e.g. a classifier head).")

    def rank_for(self, module_name: str) -> int:
        """r at `module_name` (as the adapter names it): its `rank_pattern` entry, else `r`."""
        key = match_pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """alpha at `module_name`: its `alpha_pattern` entry, else `alpha`."""
        key = match_pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scaling_for(self, module_name: str) -> float:
        """The factor ΔW is multiplied by at `module_name`: alpha/r.

        >>> LycorisConfig(r=4, alpha=8, rank_pattern={"down_proj": 2}).scaling_for("model.layers.0.mlp.down_proj")
        4.0
        """
        return self.alpha_for(module_name) / self.rank_for(module_name)
