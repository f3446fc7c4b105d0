"""Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021): T learned embeddings P
prepended to the input's, so the model reads [P; E(x)]. P-tuning trains P through an MLP or LSTM;
a saved adapter holds that encoder's output, so both load the same way.

`config` is torch-free; `model` installs the prompt on a transformers model with a forward pre-hook.
"""

from compose.prompt.config import PromptConfig

__all__ = ["PromptConfig"]
