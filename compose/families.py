"""Where per-layer adapters sit in each transformer family, by module names (no modeling code).

A bottleneck site needs three things from the model at one sub-layer (attention or feed-forward):
h, the sub-layer's output before the residual; x, the residual stream it adds to; and the
LayerNorm that closes it, if the model normalises there.

- Post-LN (BERT, RoBERTa, ELECTRA, ...): the sub-layer ends in `out(a, x) = LN(dropout(dense(a)) + x)`.
  h is the output of `out.dropout`, x is `out`'s second argument, the norm is `out.LayerNorm`, and the
  adapters' result replaces `out`'s output.
- Pre-LN (GPT-2, Llama, Mistral, Qwen2, ...): the block computes `x + sublayer(norm(x))`. h is the
  sub-layer's output, x is the input of the norm in front of it, and the adapters' result (minus the
  x the block adds) replaces the sub-layer's output.

A family is recognised by the module names inside the model's layers, so any model built the same
way fits its row, whatever its model_type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compose.errors import CompositionError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Site:
    """One adapter location in a layer; paths are relative to the layer."""

    module: str  # whose output the adapters replace
    hidden: str | None = None  # post-LN: the module whose output is h (pre-LN: `module` itself)
    norm: str | None = None  # post-LN: the LayerNorm closing the sub-layer
    residual: str | None = None  # pre-LN: the norm whose input is x (post-LN: x is `module`'s 2nd argument)


@dataclass(frozen=True)
class Family:
    """A way of building transformer layers: its adapter sites, and the names that tell it apart."""

    name: str
    post_ln: bool
    sites: dict[str, Site]  # AdapterHub's location key ('mh_adapter', 'output_adapter') → site
    excludes: tuple[str, ...] = ()  # modules whose presence means a different wiring (e.g. Gemma-2's extra norms)

    def modules(self) -> set[str]:
        """Every module path (relative to a layer) the sites need."""
        return {p for s in self.sites.values() for p in (s.module, s.hidden, s.norm, s.residual) if p}


FAMILIES: tuple[Family, ...] = (
    Family("bert", post_ln=True, sites={
        "mh_adapter": Site("attention.output", hidden="attention.output.dropout", norm="attention.output.LayerNorm"),
        "output_adapter": Site("output", hidden="output.dropout", norm="output.LayerNorm"),
    }),
    Family("gpt2", post_ln=False, sites={
        "mh_adapter": Site("attn", residual="ln_1"),
        "output_adapter": Site("mlp", residual="ln_2"),
    }),
    Family("llama", post_ln=False, sites={
        "mh_adapter": Site("self_attn", residual="input_layernorm"),
        "output_adapter": Site("mlp", residual="post_attention_layernorm"),
    }, excludes=("pre_feedforward_layernorm", "post_feedforward_layernorm")),
)

#: What transformers calls a model's list of transformer layers.
LAYER_LISTS = ("layers", "h", "layer", "blocks")


def layer_list(model: nn.Module, purpose: str) -> nn.ModuleList:
    """The model's transformer layers: its longest `layers` / `h` / `layer` / `blocks` module list (the
    longest if it has several, e.g. text and vision towers).

    Raises:
        CompositionError: the model has none (the message says what `purpose` needs it for).
    """
    from torch import nn

    lists = [m for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and path.rpartition(".")[2] in LAYER_LISTS]
    if not lists:
        raise CompositionError(f"{type(model).__name__} has no layer list (layers / h / layer / blocks); {purpose}")
    return max(lists, key=len)


def detect_family(model: nn.Module) -> tuple[Family, list[str]]:
    """The family of `model`'s transformer layers and the paths of those layers, in order.

    Raises:
        CompositionError: no layer list matches a family, or several do (e.g. two towers).
    """
    from torch import nn

    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and path.rpartition(".")[2] in LAYER_LISTS and len(module):
            names = {name for name, _ in module[0].named_modules()}
            for family in FAMILIES:
                if family.modules() <= names and not names & set(family.excludes):
                    found.append((family, [f"{path}.{i}" for i in range(len(module))]))
    if len(found) != 1:
        what = "no layers" if not found else f"{len(found)} layer lists ({', '.join(f[1][0].rpartition('.')[0] for f in found)})"
        raise CompositionError(
            f"{type(model).__name__} has {what} built like a known family ({', '.join(f.name for f in FAMILIES)}: "
            "attention.output/output with dense, dropout, LayerNorm; ln_1/attn/ln_2/mlp; input_layernorm/self_attn/"
            "post_attention_layernorm/mlp); bottleneck adapters need exactly one"
        )
    return found[0]
