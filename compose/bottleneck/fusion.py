"""AdapterFusion over bottleneck adapters, placed as AdapterHub places it.

Every site that holds the members gets a `FusionLayer` (its `fusion` child, so tensors are keyed
`<layer>.<location>.fusion.query.weight` etc.). There the last member's pre-step runs once, every
member's adapter runs on its output, and the fusion attends over their scaled up-projections u:

    query = h (query_before_ln) or the pre-step's output (x for a parallel last member)
    out   = fusion(query, u) + r            (residual_before: fusion(query, u + r))

then the last member's post-step closes the sub-layer (see `compose.bottleneck.layer`). Only the
attaching is specific: once attached, `compose.fusion.model` saves (`fusion_state`), trains
(`compose.fusion.train`), records, prunes and detaches it as it does a LoRA fusion; one fusion of
either kind per model. It makes exactly its members active.
"""

from __future__ import annotations

import torch
from torch import nn

from compose.bottleneck.model import registry, set_active_bottlenecks, sites
from compose.errors import CompositionError
from compose.fusion.config import FusionConfig
from compose.fusion.layer import FusionLayer
from compose.fusion.model import check_no_fusion, load_fusion_state, remember_fusion


def attach_bottleneck_fusion(
    model: nn.Module,
    name: str,
    config: FusionConfig,
    state: dict[str, torch.Tensor] | None = None,
    *,
    seed: int = 0,
    query_before_ln: bool | None = None,
    residual_before: bool | None = None,
) -> None:
    """
    Fuse the attached bottleneck adapters `config.members` (MAM adapters' parallel adapters count) with attention.

    Args:
        model (`nn.Module`): a model with the members attached (`attach_bottleneck` / `attach_mam`).
        name (`str`): the fusion's name.
        config ([`FusionConfig`]): members (order kept), temperature and regularisation.
        state (`dict[str, torch.Tensor]`, *optional*): `<layer>.<location>.fusion.{query,key}.{weight,bias}` and
            `.fusion.value.weight` for every fused site (`fusion_state` gives them, `read_adapterhub_fusion`
            AdapterHub's). Without it the fusion starts as the plain average of its members.
        seed (`int`): seeds a fresh fusion's random key projection (ignored with `state`).
        query_before_ln, residual_before (`bool`, *optional*): AdapterHub's placement of the query and residual
            (default: the config's fields of those names, False unless set, as in AdapterHub).

    Raises:
        [`CompositionError`]: a fusion is already attached; a member is not attached; no site holds them; a site
            holds only some members; `state` misses a site's tensors, names a site the fusion does not cover, or
            has a wrong shape.
    """
    check_no_fusion(model)
    attached = registry(model)["adapters"]
    missing = [m for m in config.members if m not in attached]
    if missing:
        raise CompositionError(f"fusion '{name}': members {missing} are not attached bottleneck adapters (attached: {list(attached)})")
    covered = {path: site for path, site in sites(model) if set(config.members) & set(site.adapters)}
    if not covered:
        raise CompositionError(f"fusion '{name}': members {config.members} have no sites to fuse (leave_out covers every layer?)")
    for path, site in covered.items():
        lacking = [m for m in config.members if m not in site.adapters]
        if lacking:
            raise CompositionError(f"site {path} holds fusion members {[m for m in config.members if m in site.adapters]} but not {lacking}; fuse adapters placed at the same sites")
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    fusions = {
        path: FusionLayer(hidden, config.temperature, generator=generator, dtype=site.dtype, device=next(iter(site.adapters.values())).adapter_up.weight.device)
        for path, site in covered.items()
    }
    if state is not None:
        load_fusion_state(model, fusions, state, where="site {}")
    set_active_bottlenecks(model, config.members)
    for path, site in covered.items():
        site.set_fusion(fusions[path], tuple(config.members))
        site.query_before_ln = config.query_before_ln if query_before_ln is None else query_before_ln
        site.residual_before = config.residual_before if residual_before is None else residual_before
    remember_fusion(model, name, config)
