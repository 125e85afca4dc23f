"""EDM teacher (Karras et al. 2022): the denoising loss, EDM or VP preconditioning, its own
diffusion sampler (Heun; DDIM for a zero-terminal-SNR VP teacher). docs/baselines.md."""

from cmexp.methods.edm.rules import SCHEMA
from cmexp.registry import Method, register_method

register_method(
    Method(
        kind="edm",
        module="cmexp.methods.edm.module.EDMLitModule",
        family="denoiser",
        wrapper="cmexp.diffusion.precond:EDMPrecond",
        sampler="heun",
        schema=SCHEMA,
        doc="docs/baselines.md",
    )
)
