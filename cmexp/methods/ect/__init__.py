"""Easy consistency tuning (ECT, Geng et al. 2025): a consistency model tuned from an EDM
denoiser with a shrinking continuous-time gap. docs/modes.md."""

from cmexp.methods.ect.rules import SCHEMA
from cmexp.registry import Method, register_method

register_method(
    Method(
        kind="ect",
        module="cmexp.methods.ect.module.ECTLitModule",
        family="consistency",
        wrapper="cmexp.diffusion.precond:CMPrecond",  # ECTPrecond in eval mode
        sampler="consistency",
        # ECT's sampler re-noises the unclamped output (locuslab/ect; issue 35 item 4)
        clip_denoised=False,
        teacher="easy consistency tuning (model=ect starts from an EDM teacher)",
        schema=SCHEMA,
        doc="docs/modes.md",
    )
)
