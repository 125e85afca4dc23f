"""Config rules of the EDM teacher (torch-free)."""

from __future__ import annotations

from cmexp.utils.checks import FRACTION, LOGNORMAL, POSITIVE, Int, Rule

SCHEMA: dict[str, Rule] = {
    **LOGNORMAL,  # ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1: -1.2, 1.2)
    "model.loss.sigma_data": POSITIVE,
    "model.label_dropout": FRACTION,  # labels -> null label with this probability (CFG)
    "model.sample_num_scales": Int(2),
}
