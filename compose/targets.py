"""Which modules an adapter targets: PEFT's `target_modules` matching, torch-free."""

from __future__ import annotations

import re
from collections.abc import Collection

from compose.errors import CompositionError


def matches_target(module_name: str, targets: Collection[str] | str) -> bool:
    """Whether `module_name` is targeted by `targets`, with PEFT's `target_modules` semantics.

    A list (or any collection) matches a name equal to one of its entries or ending in `.<entry>`,
    so `"q_proj"` matches `"model.layers.0.self_attn.q_proj"` but not `"model.layers.0.xq_proj"`.
    A single string is a regular expression that must match the whole name (`re.fullmatch`).

    Args:
        module_name: Dotted module path, e.g. `"model.layers.0.self_attn.q_proj"`.
        targets: Suffixes, or one regex.

    Raises:
        CompositionError: For the string `"all-linear"`, which depends on module types; the caller
            that knows them must expand it into names first.

    >>> matches_target("model.layers.0.self_attn.q_proj", ["q_proj", "v_proj"])
    True
    >>> matches_target("model.layers.0.self_attn.q_proj", r".*\\.0\\..*q_proj")
    True
    """
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            raise CompositionError("target 'all-linear' must be expanded to module names by a caller that knows the module types")
        return re.fullmatch(targets, module_name) is not None
    return module_name in targets or any(module_name.endswith(f".{t}") for t in targets)


def check_regex(pattern: str, what: str) -> str:
    """`pattern` if it compiles as a regular expression; a `ValueError` naming `what` otherwise (configs check
    their patterns when they are read, not at the first module they are matched against)."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression ({e})") from None
    return pattern


def check_regexes(value: object, what: str) -> object:
    """A config's patterns checked with `check_regex`: a single string (one regex), or a dict's keys (a list
    holds plain suffixes, not regexes)."""
    if isinstance(value, str):
        check_regex(value, what)
    elif isinstance(value, dict):
        for key in value:
            check_regex(key, f"{what} key")
    return value
