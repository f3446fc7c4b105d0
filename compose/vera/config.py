"""The typed VeRA configuration (torch-free); field names are PEFT's `VeraConfig` keys."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class VeraConfig(BaseModel):
    """One VeRA adapter: what ΔW = diag(λ_b)·B·diag(λ_d)·A needs besides the trained vectors."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["vera"] = "vera"
    title: ClassVar[str] = "VeRA"
    r: PositiveInt = Field(256, description="Rank of the shared random projections (the length of λ_d).")
    projection_prng_key: int = Field(0, description="Seed that regenerates the projections when the file does not hold them.")
    save_projection: bool = Field(True, description="The file holds the projections (`vera_A`, `vera_B`); else they come from projection_prng_key.")
    d_initial: float = Field(0.1, description="Initialisation only: λ_d's starting value; no effect on a trained adapter.")
    vera_dropout: float = Field(0.0, description="Training only: dropout on the input; no effect at inference.")
    fan_in_fan_out: bool = Field(False, description="The base stores weights as (in, out), as GPT-2's Conv1D does (the engine reads it off the module).")
    target_modules: list[str] | str = Field(default_factory=list, description="Module-name suffixes, or one regex, that VeRA targets.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules stored as full trained copies (e.g. a classifier head).")

    def tensor_shapes(self, targets: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
        """
        The tensors this adapter stores for `targets`, keyed as in the adapter's state (PEFT keys minus `base_model.model.`,
        so PEFT's `base_model.vera_A` is `vera_A`).

        Args:
            targets (`dict[str, tuple[int, int]]`): {module name: (in_features, out_features)} of the Linear/Conv1D modules it adapts.

        Returns:
            `dict[str, tuple[int, ...]]`: per module `vera_lambda_b` (out,) and `vera_lambda_d` (r,); with
            `save_projection`, the shared `vera_A` (r, largest in) and `vera_B` (largest out, r) that every module
            slices (`modules_to_save` copies not included).

        >>> VeraConfig(r=4).tensor_shapes({"q_proj": (32, 16), "down_proj": (64, 32)})["vera_A"]
        (4, 64)
        """
        shapes: dict[str, tuple[int, ...]] = {}
        for module, (_, n_out) in targets.items():
            shapes |= {f"{module}.vera_lambda_b": (n_out,), f"{module}.vera_lambda_d": (self.r,)}
        if self.save_projection and targets:
            shapes["vera_A"] = (self.r, max(n_in for n_in, _ in targets.values()))
            shapes["vera_B"] = (max(n_out for _, n_out in targets.values()), self.r)
        return shapes
