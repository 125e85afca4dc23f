"""Noise grids in the EDM/Karras VE setting, where time equals the noise level sigma."""

from __future__ import annotations

import torch
from torch import Tensor


def karras_sigmas(
    num_scales: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Descending Karras grid of ``num_scales`` noise levels (EDM Eq. 5; CM paper Sec. 4).

    ``sigmas[j] = (sigma_max^(1/rho) + j/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``j = 0..N-1``, so ``sigmas[0] == sigma_max`` (T = 80) and ``sigmas[-1] == sigma_min``
    (eps = 0.002) exactly. This is the code's (mirrored) index; the paper's ascending
    ``t_i`` is ``sigmas.flip(0)``. CIFAR-10 CD uses N = 18 (Table 3).

    Args:
        num_scales: N >= 2, the number of noise levels.
        sigma_min: eps > 0, the smallest level (0.002 in the paper).
        sigma_max: T > sigma_min, the largest level (80 in the paper).
        rho: grid curvature (7 in EDM and CM).

    Returns:
        ``[N]`` tensor, strictly decreasing.
    """
    if int(num_scales) != num_scales or num_scales < 2:
        raise ValueError(f"num_scales must be an integer >= 2, got {num_scales!r}")
    check_sigma_range(sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, int(num_scales), dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas.to(device=device, dtype=dtype)


def check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    """Raise a ValueError naming ``sigma_min``/``sigma_max`` unless 0 < sigma_min < sigma_max."""
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min!r}")
    if not sigma_min < sigma_max:
        raise ValueError(
            f"sigma_min must be < sigma_max, got sigma_min={sigma_min!r} >= sigma_max={sigma_max!r}"
        )


def append_zero(sigmas: Tensor) -> Tensor:
    """Append a final 0 to a descending grid, the end point of a full ODE solve (k-diffusion)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def append_dims(x: Tensor, target_ndim: int) -> Tensor:
    """Append singleton dims to ``x`` until it has ``target_ndim`` dims (for [B] -> [B,1,1,1])."""
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"x has {x.ndim} dims, more than target_ndim={target_ndim}")
    return x[(...,) + (None,) * missing]


def as_sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or ``[B]`` sigma to ``[B]`` on x's device, float32 or wider; float64
    when x is float64 (a Python float is then built in float64 directly, never rounded through
    float32 first, so ``f(x, sigma_min) = x`` holds exactly in float64)."""
    wide = x.dtype == torch.float64
    if wide and not isinstance(sigma, Tensor):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    sigma = torch.as_tensor(sigma, device=x.device)
    if wide and sigma.dtype != torch.float64:
        sigma = sigma.double()
    if not sigma.is_floating_point():
        sigma = sigma.float()
    if sigma.dtype in (torch.float16, torch.bfloat16):
        sigma = sigma.float()
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}"
        )
    return sigma
