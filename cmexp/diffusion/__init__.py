"""The consistency-model engine: sigma grids, preconditioning (EDM, CM, VP, TrigFlow), ODE
solvers, DDIM/DDPM/EDM-SDE samplers, VP noise schedules, curricula, EMA, consistency samplers.
Pure PyTorch, no Lightning."""

from cmexp.diffusion.ema import ema_update_
from cmexp.diffusion.karras import append_dims, append_zero, check_sigma_range, karras_sigmas
from cmexp.diffusion.precond import (
    CMPrecond,
    ECTPrecond,
    EDMPrecond,
    boundary_scalings,
    edm_scalings,
    gaussian_consistency_fn,
    gaussian_denoiser,
    gaussian_mixture_denoiser,
)
from cmexp.diffusion.samplers import ddim_step, sample_ddim, sample_ddpm, sample_edm_sde
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
from cmexp.diffusion.trigflow import (
    DenoiserTrigFlow,
    EDMTrigFlowPrecond,
    TrigFlowPrecond,
    sample_trigflow,
    sigma_to_trigflow,
    trigflow_to_sigma,
)
from cmexp.diffusion.vp import (
    VPrecond,
    VPSchedule,
    alpha_bar_to_sigma,
    cosine_alpha_bars,
    linear_alpha_bars,
    rescale_zero_terminal_snr,
    sigma_to_alpha_bar,
    ve_to_vp,
    vp_scalings,
    vp_to_ve,
)

__all__ = [
    "AdaptiveSchedule",
    "CMPrecond",
    "Denoiser",
    "DenoiserTrigFlow",
    "ECTPrecond",
    "EDMPrecond",
    "EDMTrigFlowPrecond",
    "FixedSchedule",
    "ImprovedSchedule",
    "Schedule",
    "SeededNoise",
    "TrigFlowPrecond",
    "VPSchedule",
    "VPrecond",
    "adaptive_schedule",
    "alpha_bar_to_sigma",
    "append_dims",
    "append_zero",
    "boundary_scalings",
    "check_sigma_range",
    "cosine_alpha_bars",
    "ddim_step",
    "describe_curriculum",
    "edm_scalings",
    "ema_update_",
    "euler_step",
    "gaussian_consistency_fn",
    "gaussian_denoiser",
    "gaussian_mixture_denoiser",
    "heun_step",
    "karras_sigmas",
    "linear_alpha_bars",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_edm_sde",
    "sample_euler",
    "sample_heun",
    "sample_multistep",
    "sample_onestep",
    "sample_trigflow",
    "sigma_to_alpha_bar",
    "sigma_to_trigflow",
    "trigflow_to_sigma",
    "ve_to_vp",
    "vp_scalings",
    "vp_to_ve",
]
