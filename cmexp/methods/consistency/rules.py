"""Config rules of CD and CT (torch-free): iCT's index sampler and guided CD."""

from __future__ import annotations

from typing import Any

from cmexp.utils.checks import POSITIVE, ConfigError, Num, Rule, is_num, present, sel

SCHEMA: dict[str, Rule] = {
    "model.loss.index_sampler.P_mean": Num(),  # iCT's lognormal levels (-1.1, 2.0)
    "model.loss.index_sampler.P_std": POSITIVE,
    "model.loss.guidance.w_min": Num(0),  # guided CD: w ~ U[w_min, w_max]
    "model.loss.guidance.w_max": Num(0),
    "model.loss.guidance.sample": Num(0),
}


def rules(cfg: Any) -> None:
    """Guided CD has an ordered w range, labels and a student that takes w."""
    if present(cfg, "model.loss.guidance._target_"):
        check_guided(cfg)


def check_guided(cfg: Any) -> None:
    """Guided CD: the w range is ordered, the default scale lies in it, the run has labels
    and its student takes w."""
    w_min, w_max = sel(cfg, "model.loss.guidance.w_min"), sel(cfg, "model.loss.guidance.w_max")
    sample = sel(cfg, "model.loss.guidance.sample")
    if is_num(w_min) and is_num(w_max) and w_min > w_max:
        raise ConfigError(
            f"model.loss.guidance.w_min={w_min} must be <= model.loss.guidance.w_max={w_max}"
        )
    if is_num(w_min) and is_num(w_max) and is_num(sample) and not w_min <= sample <= w_max:
        raise ConfigError(
            f"model.loss.guidance.sample={sample} must lie in [w_min={w_min}, w_max={w_max}]"
        )
    if sel(cfg, "dataset.use_labels") is not True and not sel(cfg, "net.label_dim"):
        raise ConfigError(
            "model.loss.guidance (guided CD) needs class labels: set dataset.use_labels=true "
            "(and a class-conditional teacher)"
        )
    if sel(cfg, "net.guidance_embed") is not True:
        raise ConfigError(
            "model.loss.guidance (guided CD) needs a student that takes w: set net.guidance_embed=true"
        )
