"""Config rules of the feature classifier (torch-free)."""

from __future__ import annotations

from typing import Any

from cmexp.utils.checks import ConfigError, Int, Rule, Str, sel

SCHEMA: dict[str, Rule] = {
    "model.translate": Int(0),  # random shifts in pixels
    "model.warmup_steps": Int(0),
    "model.eval_batch_size": Int(1),
    "model.export_path": Str(null=True),
}


def rules(cfg: Any) -> None:
    """A classifier needs labelled data."""
    if sel(cfg, "dataset.num_classes") == 0:
        raise ConfigError(
            "model=classifier needs labelled data: dataset.num_classes must be >= 1, got 0"
        )
