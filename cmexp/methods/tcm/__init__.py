"""Truncated consistency models (TCM, Lee et al., ICLR 2025), stage 2: a consistency model
trained on [t', T] from a stage-1 consistency model that stays its boundary below t' (stage 1
is ``model=ect``). docs/modes.md (TCM)."""

from cmexp.methods.tcm.rules import SCHEMA, rules
from cmexp.registry import Method, register_method

register_method(
    Method(
        kind="tcm",
        module="cmexp.methods.tcm.module.TCMLitModule",
        family="consistency",
        wrapper="cmexp.diffusion.precond:CMPrecond",  # ECTPrecond/CMPrecond in eval mode
        sampler="consistency",
        # NVlabs/TCM generate.py generator_fn re-noises the unclamped output (as ECT's)
        clip_denoised=False,
        schema=SCHEMA,
        rules=rules,
        doc="docs/modes.md (TCM)",
    )
)
