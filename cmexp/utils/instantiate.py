"""Build callbacks and loggers from their config dicts (template style: null disables one)."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` mapping that has a target."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(node) for node in cfg.values() if node and "_target_" in node]
