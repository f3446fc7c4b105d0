"""The typed (IA)³ configuration (torch-free); field names are PEFT's `IA3Config` keys."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compose.errors import CompositionError
from compose.targets import check_regexes


class IA3Config(BaseModel):
    """One (IA)³ adapter: which modules it rescales, and which of them scale their input rather than their output."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | str = Field(default_factory=list, description="Module-name suffixes, or one regex, that (IA)³ targets.")
    feedforward_modules: list[str] | str = Field(
        default_factory=list, description="Targets whose vector scales the input (1, in) instead of the output (out, 1): suffixes, or one regex."
    )
    fan_in_fan_out: bool = Field(False, description="The base stores weights as (in, out), as GPT-2's Conv1D does (the engine reads it off the module).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules stored as full trained copies (e.g. a classifier head).")

    @field_validator("target_modules", "feedforward_modules")
    @classmethod
    def _patterns_compile(cls, value, info):
        return check_regexes(value, info.field_name)

    def is_feedforward(self, module_name: str) -> bool:
        """Whether the vector at `module_name` scales the module's input, with PEFT's matching: a regex must
        match the whole name; a list entry matches any name ending in it (no '.' boundary, unlike targets).

        >>> IA3Config(feedforward_modules=["output.dense"]).is_feedforward("encoder.layer.0.attention.output.dense")
        True
        """
        if isinstance(self.feedforward_modules, str):
            return re.fullmatch(self.feedforward_modules, module_name) is not None
        return any(module_name.endswith(f) for f in self.feedforward_modules)


def combine_ia3_configs(configs: list[IA3Config]) -> IA3Config:
    """The config of a weighted sum of `configs`' adapters, as PEFT's `add_weighted_adapter` builds it: the
    union of their target and feed-forward modules (regexes joined with '|'), the rest from the first.

    Raises:
        CompositionError: the configs mix lists and regexes for target_modules or feedforward_modules (PEFT refuses it too).
    """

    def union(values: list[list[str] | str], what: str) -> list[str] | str:
        if all(isinstance(v, str) for v in values):
            return "|".join(f"({v})" for v in values)
        if any(isinstance(v, str) for v in values):
            raise CompositionError(f"cannot combine IA3 configs whose {what} mix regexes and lists; write them all one way")
        return sorted(set().union(*values))

    return configs[0].model_copy(update={
        "target_modules": union([c.target_modules for c in configs], "target_modules"),
        "feedforward_modules": union([c.feedforward_modules for c in configs], "feedforward_modules"),
    })
