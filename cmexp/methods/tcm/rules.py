"""Config rules of TCM stage 2 (torch-free)."""

from __future__ import annotations

from typing import Any

from cmexp.utils.checks import (
    LOGNORMAL,
    POSITIVE,
    Bool,
    ConfigError,
    Int,
    Num,
    OneOf,
    Rule,
    Str,
    check_checkpoint_file,
    is_num,
    sel,
)

SCHEMA: dict[str, Rule] = {
    **LOGNORMAL,  # ln t ~ Student-t(P_mean, P_std, df) on [ln t', ln T] (TCM: 0, 0.2)
    "model.stage1_path": Str(null=True),
    "model.transition_t": POSITIVE,  # t'; inside (sigma_min, sigma_max): rules() below
    "model.double_kimg": POSITIVE,
    "model.start_stage": Int(0),
    "model.loss.time_dist": OneOf("student_t", "normal"),
    "model.loss.df": POSITIVE,
    "model.loss.q": Num(1, lo_open=True),  # same rules as ECT's keys of the same name
    "model.loss.k": Num(0),
    "model.loss.b": Num(0),
    "model.loss.ratio_limit": Num(0, 1, lo_open=True, hi_open=True),
    "model.loss.boundary_prob": Num(0, 1, hi_open=True),
    "model.loss.w_boundary": Num(0),
    "model.precond.edm_scalings_in_training": Bool(),
    "model.num_scales": Int(2),
}


def rules(cfg: Any) -> None:
    """t' strictly between the wrapper's sigma_min and sigma_max; the stage-1 checkpoint is
    given and readable."""
    t = sel(cfg, "model.transition_t")
    lo, hi = sel(cfg, "model.precond.sigma_min"), sel(cfg, "model.precond.sigma_max")
    if is_num(t) and is_num(lo) and is_num(hi) and not lo < t < hi:
        raise ConfigError(
            "model.transition_t must be in (model.precond.sigma_min, model.precond.sigma_max) = "
            f"({lo}, {hi}), got {t}"
        )
    path = sel(cfg, "model.stage1_path")
    if not path:
        raise ConfigError(
            "model.stage1_path is required for TCM stage 2: set model.stage1_path=<last.ckpt of "
            "+experiment=fmnist_tcm_stage1> (an ECT, CD or CT run) or model.stage1_path=zoo:fmnist_cd"
        )
    check_checkpoint_file(path, "model.stage1_path", "the last.ckpt of an ECT, CD or CT run")
