"""Progressive distillation (Salimans & Ho 2022): rounds that halve a DDIM sampler's steps,
the CM paper's main distillation baseline. docs/baselines.md."""

from cmexp.methods.pd.rules import SCHEMA, rules
from cmexp.registry import Method, register_method

register_method(
    Method(
        kind="pd",
        module="cmexp.methods.pd.module.PDLitModule",
        family="denoiser",
        wrapper="cmexp.diffusion.precond:EDMPrecond",
        sampler="ddim",
        final_zero=False,  # N DDIM steps on N + 1 Karras levels, ending at sigma_min
        teacher="progressive distillation",
        schema=SCHEMA,
        rules=rules,
        doc="docs/baselines.md",
    )
)
