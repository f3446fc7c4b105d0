"""The typed bottleneck-adapter configuration (torch-free).

Field names are AdapterHub's `BnConfig` keys for everything that changes a trained adapter's output,
so an AdapterHub `adapter_config.json` maps onto it directly. Defaults are `seq_bn` (Pfeiffer);
`PRESETS` holds AdapterHub's named variants.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: AdapterHub's named bottleneck configs (the fields that differ from the defaults here).
PRESETS: dict[str, dict] = {
    "seq_bn": {},  # Pfeiffer et al. 2020: after the feed-forward block only
    "double_seq_bn": {"mh_adapter": True, "original_ln_before": False, "non_linearity": "swish"},  # Houlsby et al. 2019
    "par_bn": {"original_ln_before": False, "is_parallel": True, "scaling": 4.0, "reduction_factor": 2},  # He et al. 2021
    "scaled_par_bn": {"original_ln_before": False, "is_parallel": True, "scaling": "learned", "reduction_factor": 2},
}
#: The two places per layer an adapter can sit (AdapterHub's location keys).
LOCATIONS = ("mh_adapter", "output_adapter")


class BottleneckConfig(BaseModel):
    """One bottleneck adapter: x ↦ s·up(act(down(x))) at the attention and/or feed-forward output of each layer.

    How the adapter is wired around the sub-layer's residual x and LayerNorm (post-LN models; pre-LN
    models have no norm there, the block adds x itself) follows AdapterHub's `Adapter`/`ParallelAdapter`:
    `original_ln_before` feeds the adapter LN(h + x) instead of h, `residual_before_ln` says which of the
    two its own residual is, `original_ln_after` closes with LN(· + x), `is_parallel` feeds it x and adds
    its output to h instead.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["bottleneck"] = "bottleneck"
    mh_adapter: bool = Field(False, description="An adapter after each layer's self-attention.")
    output_adapter: bool = Field(True, description="An adapter after each layer's feed-forward block.")
    reduction_factor: float | dict[str, float] = Field(
        16, description="hidden ÷ bottleneck width, or per layer {'0': 8, 'default': 16} (AdapterHub's mapping)."
    )
    non_linearity: str = Field("relu", description="Activation between down- and up-projection (transformers' ACT2FN names).")
    original_ln_before: bool = Field(True, description="Feed the adapter the sub-layer's LN(h + x) rather than h.")
    original_ln_after: bool = Field(True, description="Close with the sub-layer's LN(· + x) (pre-LN models: + x).")
    residual_before_ln: bool | Literal["post_add"] = Field(
        True, description="The adapter's residual: h (True), LN(h + x)'s input h + x ('post_add') or its output (False)."
    )
    adapter_residual_before_ln: bool = Field(False, description="With ln_after: add the adapter's residual before its own LayerNorm.")
    ln_before: bool = Field(False, description="A trained LayerNorm on the adapter's input.")
    ln_after: bool = Field(False, description="A trained LayerNorm on the adapter's output.")
    is_parallel: bool = Field(False, description="Parallel adapter: input x, output added to h (He et al. 2021).")
    scaling: float | Literal["learned", "channel"] = Field(
        1.0, description="Factor on the up-projection: a constant, or a trained scalar ('learned') / vector ('channel')."
    )
    use_gating: bool = Field(False, description="A trained gate σ(g·x), averaged over the sequence, on the output (UniPELT).")
    leave_out: list[int] = Field(default_factory=list, description="Layers (from 0) without adapters.")

    @classmethod
    def preset(cls, name: str, **overrides) -> BottleneckConfig:
        """AdapterHub's named config `name` ('seq_bn', 'double_seq_bn', 'par_bn', 'scaled_par_bn'), with `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown bottleneck preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @field_validator("reduction_factor")
    @classmethod
    def _positive(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        factors = value.values() if isinstance(value, dict) else [value]
        if any(f <= 0 for f in factors):
            raise ValueError(f"reduction_factor must be > 0, got {value}")
        if isinstance(value, dict) and not all(k == "default" or k.isdigit() for k in value):
            raise ValueError(f"reduction_factor keys must be layer numbers or 'default', got {sorted(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BottleneckConfig:
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("a bottleneck adapter needs mh_adapter or output_adapter (or both)")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True (AdapterHub fails without it)")
        return self

    @property
    def locations(self) -> list[str]:
        """The sites each layer has: 'mh_adapter' and/or 'output_adapter'."""
        return [loc for loc in LOCATIONS if getattr(self, loc)]

    def bottleneck_size(self, layer: int, hidden_size: int) -> int:
        """The adapter's width in `layer`, AdapterHub's int(hidden // factor), at least 1.

        >>> BottleneckConfig(reduction_factor={"0": 4, "default": 8}).bottleneck_size(1, 32)
        4
        """
        factor = self.reduction_factor
        if isinstance(factor, dict):
            if str(layer) not in factor and "default" not in factor:
                raise ValueError(f"reduction_factor {factor} has no entry for layer {layer} and no 'default'")
            factor = factor.get(str(layer), factor.get("default"))
        return max(1, int(hidden_size // factor))
