"""Config rules of MeanFlow (torch-free)."""

from __future__ import annotations

from typing import Any

from cmexp.utils.checks import (
    FRACTION,
    POSITIVE,
    ConfigError,
    Int,
    Num,
    OneOf,
    Rule,
    is_num,
    sel,
)


def _descending_times(v: Any) -> bool:
    return (
        isinstance(v, (list, tuple))
        and all(is_num(x) and 0 < x < 1 for x in v)
        and all(b < a for a, b in zip(v, v[1:], strict=False))
    )


SCHEMA: dict[str, Rule] = {
    # the (r, t) sampler: logit-normal t and r, a `ratio` fraction with r != t
    "model.loss.times.P_mean_t": Num(),
    "model.loss.times.P_std_t": POSITIVE,
    "model.loss.times.P_mean_r": Num(null=True),
    "model.loss.times.P_std_r": Num(0, lo_open=True, null=True),
    "model.loss.times.ratio": Num(0, 1),
    "model.loss.times.version": OneOf("v0", "v1"),
    # adaptive loss weighting 1 / (||.||^2 + c)^p
    "model.loss.norm_p": Num(0),
    "model.loss.norm_eps": POSITIVE,
    "model.loss.label_dropout": FRACTION,
    # classifier-free guidance folded into the target (omega = 1, kappa = 0: none)
    "model.loss.guidance.omega": Num(0),
    "model.loss.guidance.kappa": Num(0, 1, hi_open=True),
    "model.loss.guidance.t_start": Num(0, 1),
    "model.loss.guidance.t_end": Num(0, 1),
    "model.jump_times": Rule(
        "a strictly descending list of times in (0, 1) such as [0.5]",
        _descending_times,
        bad=("abc", ["abc"], [0], [1.0], [0.3, 0.6]),
    ),
    "model.num_scales": Int(2),
}


def rules(cfg: Any) -> None:
    """MeanFlow's checks between keys: the net's second time input, guidance needs labels,
    the guidance interval."""
    if sel(cfg, "net.guidance_embed") is not True:
        raise ConfigError(
            "model=meanflow feeds the second time t - r to the net through its guidance input "
            "(a zero-initialised embedding added to the time embedding): set "
            "net.guidance_embed=true"
        )
    omega, kappa = sel(cfg, "model.loss.guidance.omega"), sel(cfg, "model.loss.guidance.kappa")
    guided = (omega is not None and omega != 1) or (kappa is not None and kappa != 0)
    if guided and sel(cfg, "dataset.use_labels") is not True:
        raise ConfigError(
            f"model.loss.guidance.omega={omega}, kappa={kappa} (classifier-free guidance) needs "
            "class labels: set dataset.use_labels=true, or omega=1 kappa=0"
        )
    start, end = sel(cfg, "model.loss.guidance.t_start"), sel(cfg, "model.loss.guidance.t_end")
    if start is not None and end is not None and not start <= end:
        raise ConfigError(
            f"model.loss.guidance.t_start={start} must be <= model.loss.guidance.t_end={end}"
        )
