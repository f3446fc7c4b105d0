"""The typed LoHa configuration (torch-free); field names are PEFT's `LoHaConfig` keys."""

from __future__ import annotations

from typing import ClassVar, Literal

from compose.lycoris import LycorisConfig


class LoHaConfig(LycorisConfig):
    """One LoHa adapter: what ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r needs besides the tensors."""

    method: Literal["loha"] = "loha"
    title: ClassVar[str] = "LoHa"

    def tensor_shapes(self, targets: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
        """
        The tensors this adapter stores for `targets`, keyed as in the adapter's state (PEFT keys minus `base_model.model.`).

        Args:
            targets (`dict[str, tuple[int, int]]`): {module name: (in_features, out_features)} of the Linear/Conv1D modules it adapts.

        Returns:
            `dict[str, tuple[int, ...]]`: per module, hada_w1_a / hada_w2_a (out, r) and hada_w1_b / hada_w2_b (r, in),
            r from `rank_pattern` or `r` (`modules_to_save` copies not included).

        >>> LoHaConfig(r=4).tensor_shapes({"q_proj": (32, 16)})["q_proj.hada_w1_a"]
        (16, 4)
        """
        shapes = {}
        for module, (n_in, n_out) in targets.items():
            r = self.rank_for(module)
            for i in ("1", "2"):
                shapes[f"{module}.hada_w{i}_a"] = (n_out, r)
                shapes[f"{module}.hada_w{i}_b"] = (r, n_in)
        return shapes
