"""Config rules of sCT/sCD (torch-free)."""

from __future__ import annotations

import math

from cmexp.utils.checks import LOGNORMAL, POSITIVE, Bool, Int, OneOf, Rule, is_int, is_num

SCHEMA: dict[str, Rule] = {
    **LOGNORMAL,  # tan(t) = e^tau / sd, tau ~ N(P_mean, P_std^2) (sCM App. G)
    "model.loss.warmup_steps": Int(0),
    "model.loss.tangent_c": POSITIVE,
    "model.loss.tangent_norm": OneOf("rms", "l2"),  # loss.TANGENT_NORMS (this file is torch-free)
    "model.loss.prior_weighting": Bool(),
    "model.loss.sigma_data": POSITIVE,
    "model.weighting.channels": Rule(
        "an even integer >= 2",
        lambda v: is_int(v) and v >= 2 and v % 2 == 0,
        bad=("abc", 2.5, 0, 3),
    ),
    "model.t_mids": Rule(
        "a list of TrigFlow times in (0, pi/2) such as [1.1]",
        lambda v: (
            isinstance(v, (list, tuple)) and all(is_num(x) and 0 < x < math.pi / 2 for x in v)
        ),
        bad=("abc", ["abc"], [0], [1.6]),
    ),
    "model.num_scales": Int(2),
}
