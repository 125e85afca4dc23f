"""Config rules of ECT (torch-free)."""

from __future__ import annotations

from cmexp.utils.checks import LOGNORMAL, POSITIVE, Bool, Int, Num, Rule

SCHEMA: dict[str, Rule] = {
    **LOGNORMAL,  # t ~ lognormal (ECT: -1.1, 2.0)
    "model.loss.q": Num(1, lo_open=True),  # the gap t - r shrinks by q per stage (ECT: 2)
    "model.loss.k": Num(0),  # n(t) = 1 + k sigmoid(-b t) (ECT: 8, 1)
    "model.loss.b": Num(0),
    "model.loss.stage": Int(0),
    "model.double_kimg": POSITIVE,
    "model.precond.edm_scalings_in_training": Bool(),
    "model.num_scales": Int(2),
}
