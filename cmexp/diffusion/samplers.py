"""Samplers of the DDPM line over a denoiser ``D(x, sigma)``: DDIM (deterministic and with
``eta > 0``), DDPM ancestral sampling, and EDM's stochastic sampler (Karras et al. 2022,
Alg. 2). Plain functions in the k-diffusion style, like :func:`sample_euler` /
:func:`sample_heun`: any denoiser callable, explicit descending ``sigmas``, per-seed noise
through the ``noise`` callable (``SeededNoise(...).randn_like``).

All of them run in the VE coordinates of this suite (x = x0 + sigma n). The DDPM/DDIM
papers' VP coordinates map onto them exactly (Song et al. 2021, DDIM Sec. 4.3; Karras et al.
2022, Sec. 3):

    alpha_bar = 1 / (1 + sigma^2),   sigma = sqrt((1 - alpha_bar) / alpha_bar),
    x_vp = x_ve / sqrt(1 + sigma^2) = sqrt(alpha_bar) x_ve.

A VP step ``x_vp(t) -> x_vp(s)`` is the VE step ``x_ve(sigma_t) -> x_ve(sigma_s)`` followed by
the rescaling, so the samplers below are the DDIM/DDPM updates written in sigma:

* DDIM (Song et al. 2021, Eq. 12) with ``eps_hat = (x - D) / sigma``:
  ``x_s = D + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
  ``c = eta sigma_s sqrt(1 - sigma_s^2 / sigma_t^2)`` (the paper's
  ``sigma_t(eta) / sqrt(alpha_bar_s)``). With ``eta = 0`` this is exactly the Euler step of
  the PF-ODE in sigma, ``x + (sigma_s - sigma_t) (x - D) / sigma_t`` (the identity is tested).
* DDPM ancestral sampling: ``x_s ~ q(x_s | x_t, x0 = D)``, the Gaussian posterior of the
  forward process, mean ``D + (sigma_s^2 / sigma_t^2) (x - D)`` and variance
  ``sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2`` (Ho et al. 2020, Eq. 6-7, "small"
  variance beta_tilde); equal to DDIM with ``eta = 1``.

Zero terminal SNR (Lin et al. 2024): ``sigmas[0]`` may be ``inf`` (alpha_bar = 0). A point at
sigma = inf has no finite VE coordinates, so there ``x`` is the VP state (pure noise z, what
``x_ve / sqrt(1 + sigma^2)`` tends to) and the denoiser returns its x0 prediction for it (a
v- or x0-prediction :class:`cmexp.diffusion.vp.VPrecond`); the first step is then
``x_s = D + sigma_s eps_hat`` with ``eps_hat = z``, the DDIM step from alpha_bar = 0. DDIM,
DDPM and Euler start there; Heun and the EDM sampler need a finite ``sigmas[0]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cmexp.diffusion.sampling import NoiseFn
from cmexp.diffusion.solvers import Callback, Denoiser, _check_descending, _check_finite_start


def _check_eta(eta: float) -> float:
    if not eta >= 0:  # also catches NaN
        raise ValueError(
            f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM's variance), got {eta!r}"
        )
    return float(eta)


def _eps_hat(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """The noise the step removes: ``(x - D)/sigma``; at sigma = inf, x itself (the VP state
    at alpha_bar = 0 is pure noise)."""
    if math.isinf(sigma):
        return x
    return (x - denoised) / sigma


def ddim_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    class_labels: Tensor | None = None,
    eta: float = 0.0,
    noise: NoiseFn | None = None,
) -> Tensor:
    """One DDIM step from ``sigma`` to ``sigma_next < sigma`` (1 NFE; Song et al. 2021, Eq. 12
    in sigma, module docstring). ``eta = 0``: deterministic, equal to :func:`euler_step`;
    ``eta = 1``: DDPM's posterior variance. ``sigma`` may be inf (zero terminal SNR)."""
    eta = _check_eta(eta)
    s, s_next = float(sigma), float(sigma_next)
    if not s_next < s:
        raise ValueError(f"sigma_next must be < sigma, got sigma={s}, sigma_next={s_next}")
    denoised = denoiser(x, sigma, class_labels)
    return _ddim_update(x, denoised, s, s_next, eta, noise)


def _ddim_update(
    x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, eta: float, noise: NoiseFn | None
) -> Tensor:
    eps = _eps_hat(x, denoised, sigma)
    if eta == 0 or sigma_next == 0:
        return denoised + sigma_next * eps
    ratio = 0.0 if math.isinf(sigma) else (sigma_next / sigma) ** 2
    c = min(eta * sigma_next * math.sqrt(1 - ratio), sigma_next)  # eta > 1 is capped at sigma_s
    z = (noise or torch.randn_like)(x)
    return denoised + math.sqrt(sigma_next**2 - c**2) * eps + c * z


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    class_labels: Tensor | None = None,
    eta: float = 0.0,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM along a descending ``sigmas`` grid (NFE = len(sigmas) - 1).

    Args:
        x: ``[B,C,H,W]`` start at ``sigmas[0]`` (``sigmas[0] * z``; ``z`` when it is inf).
        sigmas: ``[M]`` descending, ending in 0 for a full solve (or at sigma_min: a PD
            student's plan).
        eta: 0 = deterministic DDIM (= Euler in sigma); 1 = DDPM's posterior variance.
        noise: draws the fresh noise like its argument (default ``torch.randn_like``; pass
            ``SeededNoise(...).randn_like`` so image i is the same in any batch).
    """
    eta = _check_eta(eta)
    _check_descending(sigmas)
    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigmas[i], class_labels)  # the grid's dtype (float64 stays exact)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = _ddim_update(x, denoised, sig[i], sig[i + 1], eta, noise)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    class_labels: Tensor | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2 on any sub-grid): each step draws
    ``x_s ~ q(x_s | x_t, x0 = D(x_t, sigma_t))``, mean ``D + (sigma_s^2/sigma_t^2)(x - D)``,
    variance ``sigma_s^2 (1 - sigma_s^2/sigma_t^2)`` (the posterior's "small" variance
    beta_tilde; module docstring for the VP form). The step into sigma = 0 returns D.
    NFE = len(sigmas) - 1. Args as :func:`sample_ddim`."""
    _check_descending(sigmas)
    sig = [float(s) for s in sigmas]
    draw = noise or torch.randn_like
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigmas[i], class_labels)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        # (s_next^2 / s^2)(x - D) = (s_next^2 / s) eps_hat: finite (0) at s = inf
        mean = denoised + (0.0 if math.isinf(s) else s_next**2 / s) * _eps_hat(x, denoised, s)
        ratio = 0.0 if math.isinf(s) else (s_next / s) ** 2
        std = s_next * math.sqrt(1 - ratio)
        x = mean + std * draw(x) if std > 0 else mean
    return x


@torch.no_grad()
def sample_edm_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    class_labels: Tensor | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2), re-derived from the paper.

    At each level ``t_i`` inside ``[s_tmin, s_tmax]`` the noise is raised to
    ``t_hat = t_i (1 + gamma)``, ``gamma = min(s_churn / N, sqrt(2) - 1)`` (N = steps), by
    adding ``sqrt(t_hat^2 - t_i^2) s_noise z``; then one Heun step ``t_hat -> t_{i+1}`` (an
    Euler step when ``t_{i+1} = 0``). NFE = 2N - 1 on a grid ending in 0, as Heun. With
    ``s_churn = 0`` it is :func:`sample_heun` exactly. EDM's values: CIFAR-10 VP/VE use the
    deterministic sampler; ImageNet-64 S_churn = 40, S_tmin = 0.05, S_tmax = 50,
    S_noise = 1.003 (EDM Table 5).

    Args:
        x: ``[B,C,H,W]`` start at ``sigmas[0]`` (finite).
        sigmas: ``[M]`` descending. Other args as :func:`sample_ddim`.
    """
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be >= s_tmin, got s_tmax={s_tmax!r} < s_tmin={s_tmin!r}")
    _check_descending(sigmas)
    _check_finite_start(sigmas, "sample_edm_sde")
    sig = [float(s) for s in sigmas]
    steps = len(sig) - 1
    gamma_max = min(s_churn / steps, math.sqrt(2) - 1)
    draw = noise or torch.randn_like
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        gamma = gamma_max if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        level = sigmas[i] if gamma == 0 else sigmas.new_tensor(s_hat)  # keep the grid's dtype
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * draw(x)
        denoised = denoiser(x, level, class_labels)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": level, "denoised": denoised})
        d = (x - denoised) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, sigmas[i + 1], class_labels)) / s_next
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
    return x
