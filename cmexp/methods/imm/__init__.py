"""Inductive Moment Matching (IMM; Zhou, Ermon, Song, ICML 2025, arXiv 2503.07565): a one- or
few-step flow map ``x_s = f(x_t, s, t)`` trained from scratch by matching, over groups of
particles, the distribution of ``f(x_t, s, t)`` with that of ``f(x_r, s, r)`` for an ``r``
between ``s`` and ``t`` (an MMD with a Laplace kernel); sampled by pushforward on a
decreasing time grid. docs/modes.md (IMM).

Registers the method (kind ``imm``, sampling family ``flow_map``) and its two samplers
(``pushforward``: IMM's deterministic pushforward; ``pushforward_restart``: jump to the data
end and re-noise, IMM's restart sampling). Torch-free.
"""

from collections.abc import Sequence

from cmexp.methods.imm.rules import SCHEMA, rules
from cmexp.registry import Method, Sampler, register_method, register_sampler

#: The sampling family of IMM checkpoints: a flow map called as
#: ``model(x_sigma, sigma_t, class_labels, sigma_next=sigma_s) -> x_{sigma_s}``.
FAMILY = "flow_map"


def _nfe_per_level(sigmas: Sequence[float]) -> int:
    """One network evaluation per level of the plan (the last level steps into sigma_min)."""
    return len(sigmas)


register_method(
    Method(
        kind="imm",
        module="cmexp.methods.imm.module.IMMLitModule",
        family=FAMILY,
        wrapper="cmexp.methods.imm.precond:IMMPrecond",
        sampler="pushforward",
        schema=SCHEMA,
        rules=rules,
        doc="docs/modes.md (IMM)",
    )
)

_RUN = "cmexp.methods.imm.sampler:"
for _s in (
    Sampler("pushforward", FAMILY, _RUN + "run_pushforward", _nfe_per_level, finite_start=True,
            doc="IMM Alg. 2: x <- f(x, s, t) along [T, taus..., sigma_min] (deterministic)"),
    Sampler("pushforward_restart", FAMILY, _RUN + "run_pushforward_restart", _nfe_per_level,
            finite_start=True,
            doc="IMM restart sampling: x0 = f(x, sigma_min, t), re-noise to the next level"),
):  # fmt: skip
    register_sampler(_s)
