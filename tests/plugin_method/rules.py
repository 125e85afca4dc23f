"""Config rules of the log-uniform EDM test method (torch-free)."""

from __future__ import annotations

from typing import Any

from cmexp.utils.checks import POSITIVE, ConfigError, Rule, is_num, sel

SCHEMA: dict[str, Rule] = {
    "model.loss.sigma_lo": POSITIVE,
    "model.loss.sigma_hi": POSITIVE,
}


def rules(cfg: Any) -> None:
    """The log-uniform range is ordered."""
    lo, hi = sel(cfg, "model.loss.sigma_lo"), sel(cfg, "model.loss.sigma_hi")
    if is_num(lo) and is_num(hi) and not lo < hi:
        raise ConfigError(f"model.loss.sigma_lo={lo} must be < model.loss.sigma_hi={hi}")
