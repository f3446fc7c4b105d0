"""Build (and optionally train) an AdapterFusion over registered adapters: LoRA-form (LoRA, AdaLoRA) or
bottleneck (bottleneck, MAM), whichever kind the members are (`compose.methods.attach_fusion`).

Training data is JSONL: `{"text": ...}` for a causal LM, `{"text": ..., "label": ...}` for
classification (a model with a classification head) or, on an encoder without a head (e.g. a
sentence-transformers model), contrastively: same-label sentences become neighbours.
Base and adapters stay frozen; only the fusion layers (and a classification head) learn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compose.fusion.config import FusionConfig
from zoo.api import PathLike
from zoo.errors import ZooError
from zoo.loading import ResolvedAdapter, load_base

if TYPE_CHECKING:
    import torch

MAX_JSONL_BYTES = 256 << 20


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL file; each must be an object with a string "text"."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"training data {path} not found")
    if path.stat().st_size > MAX_JSONL_BYTES:
        raise ZooError(f"training data {path} is larger than {MAX_JSONL_BYTES >> 20} MB")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZooError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ZooError(f"{path}:{n}: each line needs a string \"text\"", 'e.g. {"text": "...", "label": "positive"}')
        rows.append(row)
    if not rows:
        raise ZooError(f"training data {path} is empty")
    return rows


def _objective(model: torch.nn.Module, rows: list[dict]) -> str:
    labelled = all("label" in r for r in rows)
    if type(model).__name__.endswith("ForCausalLM"):
        return "causal_lm"
    if not labelled:
        raise ZooError(f"{type(model).__name__} is not a causal LM, so its training rows need a \"label\"")
    return "classification" if type(model).__name__.endswith("ForSequenceClassification") else "contrastive"


def _batches(rows: list[dict], tokenizer, objective: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
    import torch

    classes = sorted({str(r["label"]) for r in rows}) if objective != "causal_lm" else []
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = dict(tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=256, return_tensors="pt"))
        if classes:
            batch["labels"] = torch.tensor([classes.index(str(r["label"])) for r in chunk])
        batches.append(batch)
    return batches


def build_fusion(
    members: list[ResolvedAdapter],
    *,
    base: PathLike | None,
    train: PathLike | None,
    epochs: int,
    lr: float,
    batch_size: int,
    drop_train: bool,
    prune_below: float | None,
    temperature: float,
    seed: int,
    progress: bool,
) -> tuple[FusionConfig, dict[str, torch.Tensor]]:
    """The fusion's config (members after pruning) and weights, keyed relative to the model."""
    from compose.fusion.model import fusion_attention, fusion_state, prune_fusion, record_attention
    from compose.methods import attach, attach_fusion

    base = base or members[0].base_model
    if base is None:
        raise ZooError("an attention fusion needs the base model", "pass --base PATH_OR_ID")
    if prune_below is not None and not train:
        raise ZooError("--prune-below needs data to measure attention on", "pass --train DATA.jsonl")
    model = load_base(base, task_type=members[0].task_type, architecture=members[0].architecture)
    for m in members:
        attach(model, m.name, m.config, m.state)
    config = FusionConfig(members=[m.name for m in members], temperature=temperature)
    attach_fusion(model, "fusion", config, seed=seed)
    if train:
        from compose.fusion.train import train_fusion
        from zoo.bases import load_tokenizer

        rows = read_jsonl(train)
        objective = _objective(model, rows)
        tokenizer = load_tokenizer(base)  # load_base refused remote code
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batches = _batches(rows, tokenizer, objective, batch_size)
        with _progress(progress, len(batches) * epochs) as on_step:
            train_fusion(model, batches, objective=objective, epochs=epochs, lr=lr, drop_train=drop_train, seed=seed, on_step=on_step)
        if prune_below is not None:
            import torch

            record_attention(model, True)
            with torch.no_grad():
                for batch in batches:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
            attention = fusion_attention(model)
            record_attention(model, False)
            keep = [n for n in config.members if attention[n] >= prune_below]
            if not keep:
                raise ZooError(f"--prune-below {prune_below} would remove every member (mean attention: {attention})")
            prune_fusion(model, keep)
            config = config.model_copy(update={"members": keep})
    return config, fusion_state(model)


class _progress:
    """A rich progress bar showing the loss, as the `on_step(step, loss)` callback training calls."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        self.task = self.bar.add_task("training fusion", total=self.total)
        return lambda step, loss: self.bar.update(self.task, completed=step, description=f"training fusion  loss {loss:.4f}")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
