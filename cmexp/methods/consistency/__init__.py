"""Consistency distillation (CD, CM paper Alg. 2) and consistency training (CT, Alg. 3; iCT's
pseudo-Huber, lognormal levels and curricula as options). README, docs/results.md."""

from cmexp.methods.consistency.rules import SCHEMA, rules
from cmexp.registry import Method, register_method

for _kind, _cls, _teacher in (
    ("cd", "CDLitModule", "consistency distillation"),
    ("ct", "CTLitModule", None),
):
    register_method(
        Method(
            kind=_kind,
            module=f"cmexp.methods.consistency.module.{_cls}",
            family="consistency",
            wrapper="cmexp.diffusion.precond:CMPrecond",
            sampler="consistency",
            teacher=_teacher,
            schema=SCHEMA,
            rules=rules,
            doc="docs/results.md",
        )
    )
