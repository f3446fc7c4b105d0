"""The typed prefix-tuning configuration (torch-free).

Field names are PEFT's `PrefixTuningConfig` keys (plus `position_offset`, which tells PEFT's
behaviour from AdapterHub's), so a PEFT `adapter_config.json` maps onto it directly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class PrefixConfig(BaseModel):
    """One prefix adapter: T virtual keys and values in each of `num_layers` attention layers.

    The stored layout is PEFT's: `prompt_embeddings` (T, num_layers·2·token_dim), each row viewed as
    (num_layers·2, num_attention_heads, head_dim) = layer 0 key, layer 0 value, layer 1 key, ...
    For grouped-query attention PEFT stores the KV heads: token_dim = kv_heads·head_dim.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["prefix"] = "prefix"
    num_virtual_tokens: PositiveInt = Field(description="T: virtual tokens per layer.")
    num_layers: PositiveInt = Field(description="Attention layers the prefix covers (all of the model's).")
    token_dim: PositiveInt = Field(description="Per-layer key (or value) width in the stored layout: heads·head_dim.")
    num_attention_heads: PositiveInt = Field(description="Heads in the stored layout (the KV heads under GQA).")
    prefix_projection: bool = Field(False, description="Trained through an MLP (informational: the file holds its output).")
    encoder_hidden_size: PositiveInt | None = Field(None, description="That MLP's width (informational).")
    position_offset: bool = Field(
        True, description="True (PEFT): real tokens' positions start after the prefix; False (AdapterHub): they start at 0."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> PrefixConfig:
        if self.token_dim % self.num_attention_heads:
            raise ValueError(f"token_dim {self.token_dim} is not a multiple of num_attention_heads {self.num_attention_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads
