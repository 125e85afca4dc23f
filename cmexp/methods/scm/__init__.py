"""Continuous-time consistency training and distillation, sCT and sCD (Lu & Song 2024) in
TrigFlow time, with the JVP or finite-difference tangent. docs/modes.md."""

from cmexp.methods.scm.rules import SCHEMA
from cmexp.registry import Method, register_method

for _kind, _cls, _wrapper, _teacher in (
    ("sct", "SCTLitModule", "TrigFlowPrecond", None),
    ("scd", "SCDLitModule", "EDMTrigFlowPrecond", "consistency distillation (sCD)"),
):
    register_method(
        Method(
            kind=_kind,
            module=f"cmexp.methods.scm.module.{_cls}",
            family="consistency",
            wrapper=f"cmexp.diffusion.trigflow:{_wrapper}",
            sampler="consistency",
            # sCM has no official code; FastGen's sCM sampler does not clamp (issue 35 item 4)
            clip_denoised=False,
            teacher=_teacher,
            schema=SCHEMA,
            doc="docs/modes.md",
        )
    )
