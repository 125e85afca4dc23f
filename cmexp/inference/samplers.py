"""The shared samplers in the registry's calling convention (:class:`cmexp.registry.Sampler`):
``run(model, z, sigmas, *, sigma_min, class_labels, noise, clip, clip_denoised, **options)``
with unit noise ``z`` ``[B,C,H,W]``, the descending plan ``sigmas`` and image i's own noise
generator ``noise``; each returns ``[B,C,H,W]``. ``clip`` clamps the result to [-1, 1] (pixel
models; latents are never clamped); ``clip_denoised`` is the sampling option of the same name
(``cmexp.inference.plan.check_clip_denoised``): Alg. 1 clamps each intermediate output before
re-noising, the diffusion solvers clamp the denoiser's output inside every step
(openai/consistency_models' ``clip_denoised=True``). The science lives in k-diffusion-style plain functions
(``cmexp.diffusion.sampling``, ``solvers``, ``samplers``); this module only adapts them, so
:func:`cmexp.inference.generate` draws every sample of the suite the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cmexp.diffusion.samplers import sample_ddim, sample_ddpm, sample_edm_sde
from cmexp.diffusion.sampling import sample_multistep
from cmexp.diffusion.solvers import sample_euler, sample_heun

NoiseFn = Callable[[Tensor], Tensor]


def run_consistency(
    model: nn.Module,
    z: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    sigma_min: float,
    class_labels: Tensor | None = None,
    noise: NoiseFn | None = None,
    clip: bool = True,
    clip_denoised: bool | None = None,
) -> Tensor:
    """CM paper Alg. 1 (``cmexp.diffusion.sample_multistep``): ``clip_denoised`` clamps each
    intermediate output to [-1, 1] before re-noising (None: as ``clip``), ``clip`` the result
    (pixel models; latents are never clamped)."""
    return sample_multistep(
        model,
        z,
        sigmas,
        sigma_min,
        class_labels=class_labels,
        noise=noise,
        clip_denoised=clip if clip_denoised is None else bool(clip_denoised),
        clip_output=clip,
    )


class ClampedDenoiser(nn.Module):
    """``D(x, sigma, labels).clamp(-1, 1)``: openai/consistency_models' ``clip_denoised=True``
    inside every solver step (its ``KarrasDenoiser.denoise`` output, before the ODE derivative)."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, sigma: Tensor | float, *args: object, **kwargs: object) -> Tensor:
        return self.denoiser(x, sigma, *args, **kwargs).clamp(-1, 1)


def solver_sampler(
    solver: Callable[..., Tensor], stochastic: bool = False
) -> Callable[..., Tensor]:
    """A diffusion solver ``solver(denoiser, x, sigmas, class_labels, [noise], **options)`` in
    the registry's convention: it starts from ``sigmas[0] z`` (the VP state z itself where
    sigmas[0] = inf: zero terminal SNR), takes image i's generator as its fresh noise when
    ``stochastic``, clamps the denoiser's output in every step when ``clip_denoised``
    (:class:`ClampedDenoiser`) and the result to [-1, 1] when ``clip``."""

    def run(
        model: nn.Module,
        z: Tensor,
        sigmas: Sequence[float] | Tensor,
        *,
        sigma_min: float,
        class_labels: Tensor | None = None,
        noise: NoiseFn | None = None,
        clip: bool = True,
        clip_denoised: bool | None = None,
        **options: float,
    ) -> Tensor:
        sig = torch.as_tensor(sigmas, dtype=torch.float32, device=z.device)
        x0 = z if torch.isinf(sig[0]) else z * sig[0]
        kwargs = {"noise": noise, **options} if stochastic else dict(options)
        denoiser = ClampedDenoiser(model) if clip_denoised else model
        x = solver(denoiser, x0, sig, class_labels=class_labels, **kwargs)
        return x.clamp(-1, 1) if clip else x

    run.__doc__ = f"``{solver.__module__}.{solver.__name__}`` in the registry's convention."
    return run


run_heun = solver_sampler(sample_heun)
run_euler = solver_sampler(sample_euler)
run_ddim = solver_sampler(sample_ddim, stochastic=True)
run_ddpm = solver_sampler(sample_ddpm, stochastic=True)
run_edm_sde = solver_sampler(sample_edm_sde, stochastic=True)
