"""The typed LoKr configuration (torch-free); field names are PEFT's `LoKrConfig` keys."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from compose.lycoris import LycorisConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """
    Split `dimension` into (m, n), m·n = dimension, as LyCORIS and PEFT do: (factor, dimension/factor) when
    `factor` divides it; else the divisor pair nearest the square root (-1) or with m at most `factor`, m ≤ n.

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4), factorization(30, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32), (3, 10))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor  # as given, even with m > n
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        next_m = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if next_m > factor:
            break
        m, n = next_m, dimension // next_m  # may step past √dimension by one divisor; the swap below undoes it
    return (n, m) if m > n else (m, n)


class LoKrConfig(LycorisConfig):
    """One LoKr adapter: what ΔW = (w1 ⊗ w2) · alpha/r needs besides the tensors."""

    method: Literal["lokr"] = "lokr"
    title: ClassVar[str] = "LoKr"
    decompose_both: bool = Field(False, description="w1 is stored as a rank-r product too (when r < max of its sides / 2).")
    decompose_factor: int = Field(-1, description="Split in/out as (factor, dim/factor) when it divides them; -1: near the square root.")
    rank_dropout_scale: bool = Field(False, description="Training only: rescales rank dropout; no effect at inference.")

    def tensor_shapes(self, targets: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
        """
        The tensors this adapter stores for `targets`, keyed as in the adapter's state (PEFT keys minus `base_model.model.`).

        With out = a·b and in = c·d (`factorization`, by `decompose_factor`), ΔW = w1 (a, c) ⊗ w2 (b, d). PEFT stores
        w1 whole as `lokr_w1`, or as `lokr_w1_a` (a, r) · `lokr_w1_b` (r, c) when `decompose_both` and r < max(a, c)/2;
        w2 whole as `lokr_w2`, or as `lokr_w2_a` (b, r) · `lokr_w2_b` (r, d) when r < max(b, d)/2.

        Args:
            targets (`dict[str, tuple[int, int]]`): {module name: (in_features, out_features)} of the Linear/Conv1D modules it adapts.

        >>> LoKrConfig(r=2).tensor_shapes({"q_proj": (32, 32)})
        {'q_proj.lokr_w1': (4, 4), 'q_proj.lokr_w2_a': (8, 2), 'q_proj.lokr_w2_b': (2, 8)}
        """
        shapes = {}
        for module, (n_in, n_out) in targets.items():
            r = self.rank_for(module)
            (a, b), (c, d) = factorization(n_out, self.decompose_factor), factorization(n_in, self.decompose_factor)
            if self.decompose_both and r < max(a, c) / 2:
                shapes |= {f"{module}.lokr_w1_a": (a, r), f"{module}.lokr_w1_b": (r, c)}
            else:
                shapes[f"{module}.lokr_w1"] = (a, c)
            if r < max(b, d) / 2:
                shapes |= {f"{module}.lokr_w2_a": (b, r), f"{module}.lokr_w2_b": (r, d)}
            else:
                shapes[f"{module}.lokr_w2"] = (b, d)
        return shapes
