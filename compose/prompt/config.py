"""The typed prompt-tuning / P-tuning configuration (torch-free).

Field names are PEFT's `PromptTuningConfig` / `PromptEncoderConfig` keys, so a PEFT
`adapter_config.json` maps onto it directly. Only the first three fields shape the computation:
a saved file holds the prompt itself (for P-tuning, its encoder's output), so the keys that say how
it was initialised or reparameterised while training are kept for information only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class PromptConfig(BaseModel):
    """One soft prompt: T virtual token embeddings prepended to the input's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["prompt", "ptuning"] = Field("prompt", description="'prompt' (prompt tuning) or 'ptuning' (P-tuning).")
    num_virtual_tokens: PositiveInt = Field(description="T: virtual tokens prepended.")
    token_dim: PositiveInt = Field(description="Their width: the model's input-embedding size.")
    num_transformer_submodules: PositiveInt = Field(1, description="2 for encoder-decoders (a prompt per stack); the engine takes 1.")
    # informational: the model's shape when trained, and how the prompt was initialised / reparameterised
    num_layers: PositiveInt | None = None
    num_attention_heads: PositiveInt | None = None
    prompt_tuning_init: str | None = None
    prompt_tuning_init_text: str | None = None
    encoder_reparameterization_type: str | None = None
    encoder_hidden_size: PositiveInt | None = None
    encoder_num_layers: PositiveInt | None = None
