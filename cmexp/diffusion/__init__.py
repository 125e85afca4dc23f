"""The consistency-model engine: sigma grids, preconditioning, ODE solvers, curricula, EMA,
samplers. Pure PyTorch, no Lightning."""

from cmexp.diffusion.ema import ema_update_
from cmexp.diffusion.karras import append_dims, append_zero, check_sigma_range, karras_sigmas
from cmexp.diffusion.precond import (
    CMPrecond,
    EDMPrecond,
    boundary_scalings,
    edm_scalings,
    gaussian_consistency_fn,
    gaussian_denoiser,
    gaussian_mixture_denoiser,
)
from cmexp.diffusion.sampling import SeededNoise, sample_multistep, sample_onestep
from cmexp.diffusion.schedules import (
    AdaptiveSchedule,
    FixedSchedule,
    ImprovedSchedule,
    Schedule,
    adaptive_schedule,
    describe_curriculum,
)
from cmexp.diffusion.solvers import (
    Denoiser,
    euler_step,
    heun_step,
    sample_euler,
    sample_heun,
)

__all__ = [
    "AdaptiveSchedule",
    "CMPrecond",
    "Denoiser",
    "EDMPrecond",
    "FixedSchedule",
    "ImprovedSchedule",
    "Schedule",
    "SeededNoise",
    "adaptive_schedule",
    "append_dims",
    "append_zero",
    "boundary_scalings",
    "check_sigma_range",
    "describe_curriculum",
    "edm_scalings",
    "ema_update_",
    "euler_step",
    "gaussian_consistency_fn",
    "gaussian_denoiser",
    "gaussian_mixture_denoiser",
    "heun_step",
    "karras_sigmas",
    "sample_euler",
    "sample_heun",
    "sample_multistep",
    "sample_onestep",
]
